"""Timing: a contender that runs out of memory is recorded, and the others go on."""

import torch
from torch import nn

from attention.bench.contenders import Contender
from attention.bench.timing import is_out_of_memory, run_group
from attention.bench.workload import make_case


def test_out_of_memory_is_recorded_and_the_others_go_on():
    layer = nn.Linear(8, 8)
    calls = {"n": 0}

    def runs_out(x, case):
        calls["n"] += 1
        if calls["n"] == 3:  # in the timed rounds, after the warm-up
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return layer(x)

    contenders = {"big": Contender("big", layer, runs_out),
                  "small": Contender("small", layer, lambda x, case: layer(x))}
    case = make_case("dense", 2, 4, 8, 0.25, "cpu")
    results = run_group(contenders, torch.randn(2, 4, 8), case, True, warmup=1, repeats=5)
    assert results["big"]["status"] == "oom" and results["big"]["times"] == []
    assert results["small"]["status"] == "ok" and len(results["small"]["times"]) == 5
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
