"""The application's CUDA-only set-up on the CPU, with torch.distributed and torch.cuda mocked
by autospec (so a call the real function would refuse fails here too): the nccl process
group of a GPU rank, and the GPU's random state saved in checkpoints and restored."""

from __future__ import annotations

import datetime
import inspect
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from attention.translation.checkpoint import load_checkpoint
from attention.translation.config import load_config
from attention.translation.distributed import Distributed, distributed_session
from attention.translation.run_state import restore_rng, rng_state, set_rng_state
from attention.translation.training import Trainer

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["train.device=cpu", "train.threads=1", "model.d_model=16", "model.n_heads=2",
         "model.d_ff=32", "data.toy_train_size=100", "data.toy_val_size=8",
         "data.toy_test_size=8", "train.batch_tokens=128"]
CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)

# ------------------------------------------------------------------ the process group


@pytest.fixture
def process_group(monkeypatch):
    """torch.distributed as a session sees it before any group exists, every call recorded."""
    fake = mock.Mock()
    for name in ("init_process_group", "barrier", "destroy_process_group"):
        spec = mock.create_autospec(getattr(dist, name))
        monkeypatch.setattr(dist, name, spec)
        fake.attach_mock(spec, name)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    return fake


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two CUDA devices, as the device choice asks (none is touched)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    set_device = mock.create_autospec(torch.cuda.set_device)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    return set_device


def torchrun_rank(monkeypatch, rank: int, local_rank: int, world_size: int = 2) -> None:
    for name, value in (("WORLD_SIZE", world_size), ("RANK", rank), ("LOCAL_RANK", local_rank)):
        monkeypatch.setenv(name, str(value))


def test_the_installed_torch_takes_device_id_and_timeout():
    """What the session passes, in the signature (torch 2.11's declares the same two)."""
    parameters = inspect.signature(dist.init_process_group).parameters
    assert {"backend", "timeout", "device_id"} <= set(parameters)


@pytest.mark.parametrize("device_name", ["auto", "cuda"])
def test_a_gpu_rank_joins_nccl_bound_to_its_local_gpu(monkeypatch, process_group, two_gpus,
                                                      device_name):
    torchrun_rank(monkeypatch, rank=1, local_rank=1)
    with distributed_session(device_name, timeout_minutes=7) as world:
        assert world == Distributed(rank=1, world_size=2, local_rank=1, device=CUDA1)
        assert process_group.mock_calls == [mock.call.init_process_group(
            "nccl", timeout=datetime.timedelta(minutes=7), device_id=CUDA1)]
        two_gpus.assert_called_once_with(CUDA1)
        assert world._collective_device == CUDA1  # nccl collectives take GPU tensors
    assert process_group.mock_calls[1:] == [mock.call.barrier(),
                                            mock.call.destroy_process_group()]


def test_a_second_node_binds_its_local_rank_not_its_global_rank(monkeypatch, process_group,
                                                                two_gpus):
    torchrun_rank(monkeypatch, rank=3, local_rank=1, world_size=4)
    with distributed_session("auto") as world:
        assert (world.rank, world.local_rank, world.device) == (3, 1, CUDA1)
    assert process_group.init_process_group.call_args.kwargs["device_id"] == CUDA1


def test_a_cpu_rank_joins_gloo_without_a_device(monkeypatch, process_group, two_gpus):
    torchrun_rank(monkeypatch, rank=1, local_rank=1)
    with distributed_session("cpu", timeout_minutes=2.5) as world:
        assert world.device == torch.device("cpu")
    assert process_group.init_process_group.call_args == mock.call(
        "gloo", timeout=datetime.timedelta(minutes=2.5))
    two_gpus.assert_not_called()


def test_a_group_the_caller_set_up_is_used_and_left_open(monkeypatch, process_group,
                                                         two_gpus):
    torchrun_rank(monkeypatch, rank=0, local_rank=0)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    with distributed_session("auto") as world:
        assert world.device == CUDA0
    assert process_group.mock_calls == []


# -------------------------------------------------------------- the GPU's random state


@pytest.fixture
def cuda_rng(monkeypatch):
    """torch.cuda's random-state functions (autospec'd), each device's state a distinct
    16-byte tensor as Philox's is; ``states`` holds them by device index."""
    states = {0: torch.arange(16, dtype=torch.uint8), 1: torch.arange(16, 32, dtype=torch.uint8)}
    get = mock.create_autospec(torch.cuda.get_rng_state,
                               side_effect=lambda device="cuda": states[device.index].clone())
    set_ = mock.create_autospec(torch.cuda.set_rng_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state", get)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_)
    return mock.Mock(get=get, set=set_, states=states)


def test_the_random_state_of_a_cuda_run_holds_its_gpus(cuda_rng):
    state = rng_state(CUDA1)
    cuda_rng.get.assert_called_once_with(CUDA1)
    assert torch.equal(state["cuda"], cuda_rng.states[1])
    assert torch.equal(state["torch"], torch.get_rng_state())
    set_rng_state(state, CUDA1)
    (given, device), _ = cuda_rng.set.call_args
    assert torch.equal(given, cuda_rng.states[1]) and device == CUDA1
    assert given.device.type == "cpu"  # set_rng_state takes a CPU ByteTensor


def test_a_cpu_run_neither_saves_nor_sets_a_gpu_state(cuda_rng):
    state = rng_state(torch.device("cpu"))
    assert set(state) == {"torch"}
    set_rng_state(state, CUDA0)  # a CPU checkpoint resumed on a GPU: torch's state only
    set_rng_state({**state, "cuda": cuda_rng.states[0]}, torch.device("cpu"))
    cuda_rng.get.assert_not_called()
    cuda_rng.set.assert_not_called()


@pytest.fixture
def make_trainer(tmp_path):
    made = []

    def make(name: str) -> Trainer:
        config = load_config(TINY, [f"train.run_dir={tmp_path}", f"name={name}", *SMALL])
        made.append(Trainer(config, progress_bar=False))
        return made[-1]

    yield make
    for trainer in made:
        trainer.close()


def on_gpu(trainer: Trainer, device: torch.device, rank: int = 0, world_size: int = 1) -> None:
    """Where the trainer believes it trains (its model stays on the CPU: save and restore only
    read and write state)."""
    trainer.device = device
    trainer.world = Distributed(rank=rank, world_size=world_size, local_rank=device.index,
                                device=device)


def test_a_cuda_checkpoint_round_trips_each_ranks_gpu_state(make_trainer, cuda_rng):
    first = make_trainer("first")
    on_gpu(first, CUDA0)
    torch_state = torch.get_rng_state()
    # As _on_main gathers them: rank 0's state, then rank 1's.
    checkpoint = load_checkpoint(first.save("checkpoint_last.pt",
                                            [rng_state(CUDA0), rng_state(CUDA1)]))
    assert torch.equal(checkpoint["rng"]["cuda"], cuda_rng.states[0])
    assert torch.equal(checkpoint["rng_other_ranks"][0]["cuda"], cuda_rng.states[1])
    assert torch.equal(checkpoint["rng"]["torch"], torch_state)

    for rank, device in ((0, CUDA0), (1, CUDA1)):
        cuda_rng.set.reset_mock()
        second = make_trainer(f"rank{rank}")
        on_gpu(second, device, rank=rank, world_size=2)
        torch.manual_seed(123)
        second.restore(checkpoint)
        (given, where), _ = cuda_rng.set.call_args
        assert cuda_rng.set.call_count == 1 and where == device
        assert torch.equal(given, cuda_rng.states[rank])
        assert torch.equal(torch.get_rng_state(), torch_state)


def test_save_takes_the_training_gpus_state_by_default(make_trainer, cuda_rng):
    trainer = make_trainer("run")
    on_gpu(trainer, CUDA1)
    checkpoint = load_checkpoint(trainer.save("checkpoint_best.pt"))
    cuda_rng.get.assert_called_once_with(CUDA1)
    assert torch.equal(checkpoint["rng"]["cuda"], cuda_rng.states[1])


def test_a_rank_the_checkpoint_did_not_have_starts_a_new_stream(cuda_rng):
    checkpoint = {"rng": rng_state(CUDA0), "rng_other_ranks": []}
    world = Distributed(rank=1, world_size=2, local_rank=1, device=CUDA1)
    with mock.patch("torch.manual_seed") as seed:
        restore_rng(checkpoint, world, fallback_seed=10)
    seed.assert_called_once_with(11)
    cuda_rng.set.assert_not_called()
