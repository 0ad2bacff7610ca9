import gzip

import pytest

from attention.bench.config import load_bench_config
from attention.bench.report import write_results
from attention.bench.runner import run_benchmark

from .scripts import ROOT
from .tiny import TINY


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The whole tiny config on the CPU (no memory subprocesses), and its result files."""
    config = load_bench_config(TINY, ["cpu_peak_rss=false"])
    notices = []
    report = run_benchmark(config, "cpu", command="attention-bench test", log=notices.append)
    out = tmp_path_factory.mktemp("bench")
    return config, report, write_results(report, out), notices


@pytest.fixture(scope="session")
def translation_run(tmp_path_factory):
    """The folder of a real training run, for the scripts that read one: configs/tiny.yaml
    at d_model 16 on a few toy sentences (generated from the seed: no data files), three
    steps with a numbered checkpoint at each, the last two averaged. Seconds."""
    from attention.translation.config import load_config
    from attention.translation.runs import latest_run
    from attention.translation.training import train

    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"train.run_dir={tmp_path_factory.mktemp('runs')}", "train.threads=1",
        "train.max_steps=3", "train.eval_every=1000", "train.keep_last=3",
        "train.save_every=1", "train.average_last=2", "model.d_model=16", "model.n_heads=2",
        "model.d_ff=32", "data.toy_train_size=60", "data.toy_val_size=4",
        "data.toy_test_size=4", "eval.val_sentences=4"])
    train(config, progress_bar=False, log=lambda message: None)
    return latest_run(config.run_path)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A test set the tests write themselves (source plain, references gzipped, one empty
    line), in place of ../shared/data: ``(source, reference)`` paths."""
    folder = tmp_path_factory.mktemp("corpus")
    sources = ["the dog sees a cat", "a cat runs", "the big dog sleeps", "", "the girls run"]
    references = ["der hund sieht eine katze", "eine katze rennt", "der große hund schläft",
                  "", "die mädchen rennen"]
    source, reference = folder / "test.src", folder / "test.ref.gz"
    source.write_text("\n".join(sources) + "\n", encoding="utf-8")
    with gzip.open(reference, "wt", encoding="utf-8") as file:
        file.write("\n".join(references) + "\n")
    return source, reference
