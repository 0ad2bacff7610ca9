"""Before/after figures for each optimisation of the Encoder, for benchmarks/NOTES.md.

Each optimisation is switched off on its own, and the Encoder with it off is timed against
the Encoder with everything on, alternating run by run in one process; the figure is the
median over rounds of (time with it off) / (time with everything on), so > 1 means the
optimisation helps. Config: the ``small`` benchmark shapes, float32, CPU threads as given.

    python benchmarks/ablations.py --rounds 7 --threads 2

The switches:
- ``fused_qkv``: q, k and v as three matmuls, the MultiHeadAttention forward of commit
  9db1123 (before the fused projection), on dense batches (it has no packed path);
- ``packing``: the padded computation (an additive mask, which the packed path does not take);

Each round runs the two settings in turn, starting with the other one than the round before.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import torch

from attention import Encoder, MultiHeadAttention
from attention.common.files import write_atomic

D_MODEL, N_HEADS, N_LAYERS, D_FF, BATCH, LENGTH = 512, 8, 6, 2048, 32, 128
BEFORE_FUSED_QKV = "9db1123"


def old_forward() -> types.FunctionType:
    """MultiHeadAttention.forward as it was before the fused projection (from git)."""
    source = subprocess.run(["git", "show", f"{BEFORE_FUSED_QKV}:attention/multihead.py"],
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("attention._multihead_before")
    module.__package__ = "attention"
    exec(compile(source, "multihead_before.py", "exec"), module.__dict__)  # noqa: S102
    return module.MultiHeadAttention.forward


@contextlib.contextmanager
def switched_off(name: str, encoder: Encoder) -> Iterator[None]:
    if name == "fused_qkv":
        before = old_forward()

        def forward(self, *args, packing=None, **kwargs):  # the old one had no packed path
            assert packing is None, "fused_qkv is compared on dense batches only"
            return before(self, *args, **kwargs)

        saved = MultiHeadAttention.forward
        MultiHeadAttention.forward = forward
        try:
            yield
        finally:
            MultiHeadAttention.forward = saved
    else:
        yield


def time_once(encoder: Encoder, x: torch.Tensor, mask: torch.Tensor | None, training: bool,
              additive: bool) -> float:
    if mask is not None and additive:
        mask = torch.zeros(mask.shape).masked_fill(mask, float("-inf"))
    real = None if mask is None else ~(mask if mask.dtype == torch.bool else mask.isinf())
    start = time.perf_counter()
    if training:
        encoder.train()
        x = x.detach().requires_grad_()
        out = encoder(x, key_padding_mask=mask)
        (out if real is None else out[real]).pow(2).mean().backward()
        encoder.zero_grad(set_to_none=True)
    else:
        encoder.eval()
        with torch.inference_mode():
            encoder(x, key_padding_mask=mask)
    return time.perf_counter() - start


def measure(name: str, encoder: Encoder, x: torch.Tensor, mask: torch.Tensor | None,
            training: bool, rounds: int) -> dict:
    additive = name == "packing"

    def off() -> float:
        with switched_off(name, encoder):
            return time_once(encoder, x, mask, training, additive)

    def on() -> float:
        return time_once(encoder, x, mask, training, False)

    for _ in range(2):  # warm-up
        off(), on()
    ratios, times_off, times_on = [], [], []
    for round_index in range(rounds):
        if round_index % 2:  # alternate which setting runs first
            t_on, t_off = on(), off()
        else:
            t_off, t_on = off(), on()
        times_off.append(t_off)
        times_on.append(t_on)
        ratios.append(t_off / t_on)
    return {"speedup": statistics.median(ratios), "ratios": ratios,
            "ms_off": 1e3 * statistics.median(times_off),
            "ms_on": 1e3 * statistics.median(times_on)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/ablations-cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder = Encoder(D_MODEL, N_HEADS, N_LAYERS, D_FF, dropout=0.0, positional=None)
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    lengths = torch.linspace(LENGTH // 2, LENGTH, BATCH).round().long()
    padded = torch.arange(LENGTH)[None, :] >= lengths[:, None]  # 25% padding
    results = []
    for name in ("fused_qkv", "packing"):
        for training in (False, True):
            cases = {"packing": [("padded", padded)], "fused_qkv": [("dense", None)]}[name]
            for case, mask in cases:
                row = {"optimisation": name, "pass": "training" if training else "inference",
                       "case": case, **measure(name, encoder, x, mask, training, args.rounds)}
                results.append(row)
                print(f"{name:20s} {row['pass']:9s} {case:6s} off {row['ms_off']:7.1f} ms  "
                      f"on {row['ms_on']:7.1f} ms  speedup {row['speedup']:.3f}", flush=True)
    report = {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
              "command": " ".join(["python", "benchmarks/ablations.py", *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d"), "results": results}
    write_atomic(args.out, lambda f: f.write(json.dumps(report, indent=2).encode()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
