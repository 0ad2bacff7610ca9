"""The contenders: forced SDPA kernels, a compile that fails, and the peers' activation taken
from the same entry of attention.layers.ACTIVATIONS as ours."""

import pytest
import torch
from torch import nn

from attention.bench.config import DEFAULT_CONTENDERS, load_bench_config
from attention.bench.contenders import Activation, build_contenders, build_torch
from attention.bench.correctness import check_against_torch
from attention.bench.report import format_table
from attention.bench.runner import run_benchmark
from attention.bench.workload import make_case, make_input
from attention.layers import ACTIVATIONS

from .tiny import HAS_X_TRANSFORMERS, TINY, one_cell


def test_forced_sdpa_kernels_run_where_the_device_has_them():
    config = load_bench_config(TINY, one_cell())
    names = ["ours-fused", "ours-sdpa-math", "ours-sdpa-flash", "ours-sdpa-cudnn", "torch-bias"]
    report = run_benchmark(config, "cpu", contenders=names, log=lambda _: None)
    cells = {c["contender"]: c for c in report["cells"]}
    for name in ("ours-sdpa-math", "ours-sdpa-flash"):  # the CPU has these two
        assert cells[name]["status"] == "ok" and "torch-bias" in cells[name]["ratios"]
    assert cells["ours-sdpa-cudnn"]["status"] == "error"  # and not this one
    assert "No viable backend" in cells["ours-sdpa-cudnn"]["error"]
    assert "ours-sdpa-math" not in DEFAULT_CONTENDERS


def test_a_failing_compile_is_recorded_not_raised():
    config = load_bench_config(TINY, one_cell("compile_backend=no-such-backend"))
    report = run_benchmark(config, "cpu", contenders=["ours-compiled", "torch-bias"],
                           log=lambda _: None)
    cells = {c["contender"]: c for c in report["cells"]}
    assert cells["ours-compiled"]["status"] == "error"
    assert cells["ours-compiled"]["error"] and cells["ours-compiled"]["median_ms"] is None
    assert cells["torch-bias"]["status"] == "ok"
    assert "error" in format_table(report)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_peers_use_the_library_s_activation_function(name):
    config = load_bench_config(TINY, [f"activation={name}"])
    layer = build_torch(config, bias=False).layers[0]  # a deep copy of the layer it built
    x = torch.randn(3, 5)
    torch.testing.assert_close(layer.activation(x), ACTIVATIONS[name](x), rtol=0, atol=0)
    torch.testing.assert_close(Activation(name)(x), ACTIVATIONS[name](x), rtol=0, atol=0)
    if name in ("relu", "gelu"):  # torch's inference fast path recognises these two
        assert layer.activation is ACTIVATIONS[name]
        assert layer.activation_relu_or_gelu == {"relu": 1, "gelu": 2}[name]


def test_a_new_activation_reaches_ours_and_torch_s_alike(monkeypatch):
    monkeypatch.setitem(ACTIVATIONS, "square", lambda x: x * x)
    config = load_bench_config(TINY, ["activation=square"])
    names = ["ours-fused", "torch-nobias"] + (["x-transformers"] if HAS_X_TRANSFORMERS else [])
    contenders = build_contenders(config, names, "cpu", torch.float32)
    case = make_case("padded", config.batch, 16, config.d_model, config.padding, "cpu")
    x = make_input(config, 16, "cpu", torch.float32)
    differences = check_against_torch(contenders["ours-fused"].module,
                                      contenders["torch-nobias"].module, x, case)
    assert all(0 <= d < 1e-4 for d in differences.values()), differences
    if HAS_X_TRANSFORMERS:
        modules = list(contenders["x-transformers"].module.modules())
        activations = [m for m in modules if isinstance(m, Activation)]
        assert activations and all(m.name == "square" for m in activations)
        assert not any(isinstance(m, nn.GELU) for m in modules)
