"""Training on several processes with torchrun (gloo, CPU): the same update as one process on
the same global batch, checkpoints that move between rank counts, and failures that end the
whole run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attention.translation.config import ConfigError, load_config
from attention.translation.distributed import Distributed, distributed_session, shard
from attention.translation.plotting import read_metrics
from attention.translation.runs import latest_run
from attention.translation.training import train

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
# Dropout off: ranks draw their own dropout masks, so only a deterministic model can match one
# process bit for bit (up to the order of float additions).
COMMON = ["train.threads=1", "model.dropout=0.0", "train.eval_every=10", "train.log_every=5"]


def torchrun(run_dir: Path, *args: str, nproc: int = 2,
             timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N scripts/train.py --config tiny.yaml ...``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={nproc}", str(ROOT / "scripts" / "train.py"), "--config", str(TINY),
         f"train.run_dir={run_dir}", *COMMON, *args],
        capture_output=True, text=True, timeout=timeout, env=env)


def one_process(run_dir: Path, *overrides: str, resume: bool = False, log=None) -> dict:
    config = load_config(TINY, [f"train.run_dir={run_dir}", *COMMON, *overrides])
    return train(config, resume=resume, progress_bar=False, log=log or (lambda message: None))


def weights(run: Path) -> dict[str, torch.Tensor]:
    """The latest weights of ``run``, a config's ``runs/NAME``: its latest run's."""
    return torch.load(latest_run(run) / "checkpoint_last.pt", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)


def train_records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(latest_run(run) / "metrics.jsonl")
            if r["kind"] == "train"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Twenty steps of the same global batch (two batches per step): two processes with one
    batch each, and one process accumulating two; and one process straight on to step 30."""
    root = tmp_path_factory.mktemp("ddp")
    done = torchrun(root, "name=two", "train.max_steps=20")
    assert done.returncode == 0, done.stderr[-3000:]
    one_process(root, "name=one", "train.max_steps=20", "train.grad_accum_steps=2")
    one_process(root, "name=straight", "train.max_steps=30", "train.grad_accum_steps=2")
    return root


def test_two_processes_make_the_same_update_as_one_accumulating_the_same_batches(runs):
    two, one = latest_run(runs / "two"), latest_run(runs / "one")
    assert_same_weights(two, one)
    records_two, records_one = train_records(two), train_records(one)
    assert records_two.keys() == records_one.keys() == {5, 10, 15, 20}
    for step, record in records_one.items():
        # The gradient's scale too (AdamW's update would hide a wrong loss normalisation).
        for key in ("loss", "grad_norm"):
            assert records_two[step][key] == pytest.approx(record[key], rel=1e-5), (step, key)
    saved_two = torch.load(two / "checkpoint_last.pt", weights_only=True)
    saved_one = torch.load(one / "checkpoint_last.pt", weights_only=True)
    for key in ("step", "epoch", "batch_in_epoch", "best_step"):
        assert saved_two["progress"][key] == saved_one["progress"][key], key
    assert saved_two["progress"]["ranks"] == 2 and saved_one["progress"]["ranks"] == 1
    assert len(saved_two["rng_other_ranks"]) == 1  # each rank's dropout stream is kept


def test_rank_zero_alone_writes_the_run_files(runs):
    two = latest_run(runs / "two")
    records = read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "val"] == [10, 20]  # once, not per rank
    assert len([r for r in records if r["kind"] == "train"]) == 4
    assert not [p.name for p in two.iterdir() if p.name.endswith(".tmp")]
    assert json.loads((two / "results.json").read_text())["ranks"] == 2


def test_a_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    shutil.copytree(runs / "two", tmp_path / "two")
    messages = []
    one_process(tmp_path, "name=two", "train.max_steps=30", "train.grad_accum_steps=2",
                resume=True, log=messages.append)
    assert_same_weights(tmp_path / "two", runs / "straight")
    assert any("resuming from step 20" in m for m in messages)
    assert not any("global batch changes" in m for m in messages)  # 2 × 1 = 1 × 2


def test_a_one_process_checkpoint_resumes_on_two_processes(runs, tmp_path):
    shutil.copytree(runs / "one", tmp_path / "one")
    done = torchrun(tmp_path, "name=one", "train.max_steps=30", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(tmp_path / "one", runs / "straight")


def test_with_dropout_two_ranks_resume_exactly_on_two_ranks(tmp_path):
    # Each rank's own dropout stream must come back from the checkpoint (rank 1's included).
    dropout = ["model.dropout=0.2", "train.eval_every=5"]
    for name, steps in (("straight", 10), ("resumed", 5)):
        done = torchrun(tmp_path, f"name={name}", f"train.max_steps={steps}", *dropout)
        assert done.returncode == 0, done.stderr[-3000:]
    done = torchrun(tmp_path, "name=resumed", "train.max_steps=10", *dropout, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(tmp_path / "resumed", tmp_path / "straight")


def test_resuming_with_another_global_batch_says_so(runs, tmp_path):
    shutil.copytree(runs / "one", tmp_path / "one")
    messages = []
    one_process(tmp_path, "name=one", "train.max_steps=21", "train.grad_accum_steps=1",
                resume=True, log=messages.append)
    assert any("the checkpoint took 2 batches per step, this run takes 1" in m
               for m in messages)


def test_after_a_torchrun_restart_the_run_continues_from_its_checkpoint(runs, tmp_path,
                                                                     monkeypatch):
    shutil.copytree(runs / "one", tmp_path / "one")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun --max-restarts did it
    messages = []
    one_process(tmp_path, "name=one", "train.max_steps=30", "train.grad_accum_steps=2",
                log=messages.append)
    assert any("resuming from step 20" in m for m in messages)
    assert_same_weights(tmp_path / "one", runs / "straight")


def test_a_failing_rank_ends_the_whole_run_with_its_error(runs, tmp_path):
    # Rank 0 cannot draw the curves at the first validation while rank 1 waits for it.
    shutil.copytree(runs / "two", tmp_path / "broken")
    curves = latest_run(tmp_path / "broken") / "curves.png"
    curves.unlink(missing_ok=True)
    curves.mkdir()
    done = torchrun(tmp_path, "name=broken", "train.max_steps=30", "--resume", timeout=180)
    assert done.returncode != 0
    assert "IsADirectoryError" in done.stderr
    assert "curves.png" in done.stderr


def test_a_step_needs_at_least_its_batches_in_an_epoch(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.grad_accum_steps: a step takes 1000"):
        one_process(tmp_path, "train.grad_accum_steps=1000", "train.max_steps=2")


def test_grad_accum_steps_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.grad_accum_steps: expected a positive"):
        load_config(TINY, ["train.grad_accum_steps=0"])


@given(st.integers(0, 40), st.integers(1, 8))
def test_the_shards_of_a_step_are_disjoint_and_cover_it(n_batches, world_size):
    group = list(range(n_batches))
    shares = [shard(group, rank, world_size) for rank in range(world_size)]
    assert sorted(b for share in shares for b in share) == group
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1


def test_shard_names_a_bad_rank():
    with pytest.raises(ValueError, match=r"rank: expected 0 ≤ rank < world_size=2, got 2"):
        shard([1, 2, 3], 2, 2)


def test_without_torchrun_there_is_one_rank_and_collectives_return_their_input(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed_session("cpu") as ranks:
        assert ranks == Distributed(device=torch.device("cpu"))
        assert ranks.is_main and not ranks.enabled
        assert ranks.sum([3, 1.5]) == [3.0, 1.5]
        assert ranks.broadcast({"a": 1}) == {"a": 1}
        assert ranks.gather("x") == ["x"]
        ranks.barrier()


def test_a_world_size_without_a_rank_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="RANK: WORLD_SIZE is set"):
        with distributed_session("cpu"):
            pass


@pytest.fixture
def two_gpus(monkeypatch):
    """What the device choice sees on a machine with two GPUs (none is touched)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


@pytest.mark.parametrize("name", ["auto", "cuda"])
def test_each_cuda_rank_takes_the_gpu_of_its_local_rank(two_gpus, name):
    from attention.translation.distributed import _rank_device

    assert _rank_device(name, 1) == torch.device("cuda", 1)
    assert two_gpus == [torch.device("cuda", 1)]
    assert _rank_device("cpu", 1) == torch.device("cpu")


def test_one_named_gpu_for_every_rank_is_refused(two_gpus):
    from attention.translation.distributed import _rank_device

    with pytest.raises(ConfigError, match=r"train\.device: .*expected auto or cuda, got 'cuda:1'"):
        _rank_device("cuda:1", 0)


def test_more_processes_than_gpus_is_a_clear_error(two_gpus):
    from attention.translation.distributed import _rank_device

    with pytest.raises(ConfigError, match=r"LOCAL_RANK=2 needs GPU 2, but this machine has 2"):
        _rank_device("cuda", 2)


def _pids_of_rank(marker: str, rank: int) -> list[int]:
    """The processes whose environment holds ``marker`` and ``RANK=rank`` (Linux's /proc)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            entries = environ.read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in entries and f"RANK={rank}".encode() in entries:
            found.append(int(environ.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux's /proc")
def test_a_rank_killed_outright_stops_the_others_within_a_minute_naming_it(tmp_path):
    marker = f"ATTENTION_RANK_KILL_TEST={tmp_path}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", marker.split("=")[0]: str(tmp_path)}
    env.pop("WORLD_SIZE", None)
    run = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "scripts" / "train.py"), "--config", str(TINY),
         f"train.run_dir={tmp_path}", *COMMON, "train.max_steps=100000", "train.log_every=1",
         "train.eval_every=100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until both ranks are training
            runs = list((tmp_path / "tiny").glob("version_*/metrics.jsonl"))
            if runs and len(runs[0].read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run did not start training within 120 s")
        [victim] = _pids_of_rank(marker, 1)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = run.communicate(timeout=90)
        stopped = time.monotonic() - killed
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0
    assert stopped < 60, f"the other rank took {stopped:.0f} s to stop"
    assert not _pids_of_rank(marker, 0)  # no rank left behind
    # The survivor says in one line why it stops, instead of a collective's traceback ...
    survivor = [line for line in stderr.splitlines()
                if line.startswith("error: [rank 0] another rank stopped")]
    assert len(survivor) == 1, stderr[-3000:]
    # ... and torchrun's summary names the rank that was killed, and how. (Not necessarily as
    # its "root cause": torchrun stamps failures with no error file in whole seconds when it
    # notices them, so when both ranks are found dead in the same second it names rank 0.)
    summary = stderr.split("Failures:", 1)[1]
    failures = re.split(r"\n\s*\[\d+\]:\n", summary)
    assert any("rank      : 1 (local_rank: 1)" in failure and "(SIGKILL)" in failure
               for failure in failures), summary
