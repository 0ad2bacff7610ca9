"""Loading checkpoints: a file that is not a whole checkpoint of this package is refused in one
line that names it, never with torch's advice to load it unsafely."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attention.translation.checkpoint import load_checkpoint, save_checkpoint
from attention.translation.cli import plot_attention_main, translate_main
from attention.translation.config import load_config
from attention.translation.runs import latest_run
from attention.translation.training import train
from attention.translation.translator import Translator

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real checkpoint of a two-step run."""
    config = load_config(TINY, [f"train.run_dir={tmp_path_factory.mktemp('runs')}",
                                "train.threads=1", "train.max_steps=2", "train.eval_every=1000",
                                "eval.val_sentences=2"])
    train(config, progress_bar=False, log=lambda message: None)
    return latest_run(config.run_path) / "checkpoint_best.pt"


def truncated(checkpoint: Path, path: Path, fraction: float) -> Path:
    data = checkpoint.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def bad_files(checkpoint: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """Files that are not whole checkpoints, with what the message must say of each."""
    files = {}
    for fraction in (0.0, 0.001, 0.5, 0.999):
        path = truncated(checkpoint, folder / f"cut_{fraction}.pt", fraction)
        files[f"truncated to {fraction:.1%}"] = (path, "empty" if fraction == 0 else "truncated")
    text = folder / "notes.pt"
    text.write_text("these are my notes, not a checkpoint\n")
    files["a text file"] = (text, "not written by torch.save")
    plain = folder / "plain.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, plain)
    files["a dict without our keys"] = (plain, "missing keys 'format', 'config', 'model'")
    whole = torch.load(checkpoint, weights_only=True)
    partial = folder / "partial.pt"
    save_checkpoint(partial, {k: v for k, v in whole.items() if k not in ("format", "tokenizers")})
    files["ours without its tokenizers"] = (partial, "missing key 'tokenizers'")
    module = folder / "module.pt"
    torch.save(torch.nn.Linear(2, 2), module)  # a pickled object: weights-only loading refuses it
    files["a pickled module"] = (module, "a weights-only load refuses it")
    return files


CASES = ["truncated to 0.0%", "truncated to 0.1%", "truncated to 50.0%", "truncated to 99.9%",
         "a text file", "a dict without our keys", "ours without its tokenizers",
         "a pickled module"]


@pytest.fixture(scope="module")
def bad(checkpoint, tmp_path_factory):
    return bad_files(checkpoint, tmp_path_factory.mktemp("bad"))


def test_the_whole_checkpoint_loads(checkpoint):
    assert load_checkpoint(checkpoint)["progress"]["step"] == 2
    assert Translator.from_checkpoint(checkpoint, device="cpu").translate(["a cat runs"])


@pytest.mark.parametrize("case", CASES)
def test_load_checkpoint_refuses_what_is_not_a_whole_checkpoint(bad, case):
    path, reason = bad[case]
    with pytest.raises(ValueError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a complete checkpoint of this package (")
    assert reason in message and "\n" not in message and "weights_only" not in message


def assert_one_line_naming(path: Path, status: int, captured) -> None:
    assert status == 2
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"error: {path}: not a complete checkpoint of this package (")
    assert "weights_only" not in captured.err and "Traceback" not in captured.err


@pytest.mark.parametrize("case", CASES)
def test_translate_command_says_in_one_line_which_file_is_not_a_checkpoint(bad, case, capsys):
    path, _ = bad[case]
    status = translate_main(["--checkpoint", str(path), "--device", "cpu", "a cat runs"])
    assert_one_line_naming(path, status, capsys.readouterr())


@pytest.mark.parametrize("case", ["truncated to 50.0%", "a text file", "a pickled module"])
def test_plot_command_says_in_one_line_which_file_is_not_a_checkpoint(bad, case, tmp_path,
                                                                      capsys):
    path, _ = bad[case]
    status = plot_attention_main(["--checkpoint", str(path), "--device", "cpu", "a cat runs",
                                  "--out", str(tmp_path / "plots")])
    assert_one_line_naming(path, status, capsys.readouterr())
    assert not (tmp_path / "plots").exists()


def test_an_unreadable_file_is_one_line_too(checkpoint, monkeypatch, capsys):
    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(torch, "load", refuse)
    status = translate_main(["--checkpoint", str(checkpoint), "--device", "cpu", "a cat runs"])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert captured.err == f"error: [Errno 13] Permission denied: '{checkpoint}'\n"


def test_a_checkpoint_whose_tokenizers_or_weights_do_not_load_is_one_line(checkpoint, tmp_path,
                                                                           capsys):
    whole = torch.load(checkpoint, weights_only=True)
    broken_tokenizer = tmp_path / "tokenizer.pt"
    save_checkpoint(broken_tokenizer, {**whole, "tokenizers": {"source": "{not json",
                                                              "target": "{}"}})
    wrong_weights = tmp_path / "weights.pt"
    save_checkpoint(wrong_weights, {**whole, "model": {"not_a_weight": torch.ones(1)}})
    for path in (broken_tokenizer, wrong_weights):
        with pytest.raises(ValueError, match="not a complete checkpoint of this package"):
            Translator.from_checkpoint(path, device="cpu")
        assert translate_main(["--checkpoint", str(path), "a dog"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err


def test_the_plot_command_refuses_an_empty_sentence(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        plot_attention_main(["--checkpoint", str(checkpoint), "  ", "--out", str(tmp_path)])
    assert stopped.value.code == 2
    assert "sentence: expected a sentence" in capsys.readouterr().err
    translator = Translator.from_checkpoint(checkpoint, device="cpu")
    with pytest.raises(ValueError, match="sentence: expected a sentence"):
        translator.attention("")
