"""CPU time of Transformer.generate (greedy and beam search) at this tree against an earlier
revision's decoding, in alternated rounds inside one process.

The baseline is ``attention/decoding.py`` read from a git revision (``--baseline``, default
the commit before the host-round-trip change) and that revision's step function, which
banned PAD and BOS with a Python-list index (``logits[:, [pad, bos]] = -inf``). Both run on
the same model and sources; their outputs are checked equal before timing.

    python benchmarks/decoding_time.py --rounds 7
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import time
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from attention import Transformer

ROOT = Path(__file__).resolve().parent.parent
BOS, EOS, PAD = 1, 2, 0


def load_baseline(revision: str) -> types.ModuleType:
    """``attention/decoding.py`` as it was at ``revision``, as a module."""
    source = subprocess.run(["git", "show", f"{revision}:attention/decoding.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    module = types.ModuleType("baseline_decoding")
    exec(compile(source, f"{revision}:attention/decoding.py", "exec"), module.__dict__)
    return module


@torch.no_grad()
def baseline_generate(decoding: types.ModuleType, model: Transformer, src: torch.Tensor,
                      max_new_tokens: int, beam_size: int) -> torch.Tensor:
    """The baseline revision's ``Transformer._generate``, on its own decoding module."""
    model.eval()
    batch = src.shape[0]
    memory = model.encode(src)
    memory_mask = model.padding_mask(src)
    if beam_size > 1:
        memory = memory.repeat_interleave(beam_size, dim=0)
        memory_mask = memory_mask.repeat_interleave(beam_size, dim=0)
    cache = model.decoder.new_cache()

    def step(last_ids):
        logits = model._decode(last_ids, memory, memory_mask, cache=cache,
                               return_attention=False)[:, -1].float()
        logits[:, [model.pad_id, BOS]] = float("-inf")
        return logits.log_softmax(dim=-1)

    if beam_size == 1:
        return decoding.greedy_search(step, batch, BOS, EOS, model.pad_id, max_new_tokens,
                                      device=src.device)
    return decoding.beam_search(step, cache.reorder, batch, BOS, EOS, model.pad_id,
                                max_new_tokens, beam_size, 1.0, device=src.device)


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class TableStep:
    """A step that costs next to nothing: log-probabilities looked up by the last token,
    so that the search's own bookkeeping is what is timed."""

    def __init__(self, vocab: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.table = torch.randn(64, vocab, generator=generator).log_softmax(-1)
        self.table[:, [PAD, BOS, EOS]] = float("-inf")  # runs the whole length

    def __call__(self, last: torch.Tensor) -> torch.Tensor:
        return self.table[last[:, 0] % 64]


def search(decoding: types.ModuleType, batch: int, max_new_tokens: int, beam_size: int,
           vocab: int) -> torch.Tensor:
    step = TableStep(vocab)
    if beam_size == 1:
        return decoding.greedy_search(step, batch, BOS, EOS, PAD, max_new_tokens)
    return decoding.beam_search(step, lambda index: None, batch, BOS, EOS, PAD, max_new_tokens,
                                beam_size, 1.0)


def compare(label: str, old: Callable[[], torch.Tensor], new: Callable[[], torch.Tensor],
            rounds: int) -> None:
    """Check both give the same ids, then time them in alternated rounds."""
    assert torch.equal(new(), old()), f"{label}: outputs differ"
    times: dict[str, list[float]] = {"baseline": [], "this tree": []}
    for round_index in range(rounds):
        pair = [("baseline", old), ("this tree", new)]
        for name, fn in pair if round_index % 2 == 0 else pair[::-1]:
            times[name].append(seconds(fn))
    ratios = [b / n for b, n in zip(times["baseline"], times["this tree"], strict=True)]
    print(f"{label}: baseline {statistics.median(times['baseline']) * 1e3:.1f} ms, this tree "
          f"{statistics.median(times['this tree']) * 1e3:.1f} ms, baseline ÷ this tree "
          f"{statistics.median(ratios):.2f}× (per round {', '.join(f'{r:.2f}' for r in ratios)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="5c7034c", help="git revision of the baseline")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab = 8000
    model = Transformer(vocab, vocab, d_model=256, n_heads=4, n_encoder_layers=3,
                        n_decoder_layers=3, d_ff=1024, dropout=0.0, pad_id=PAD).eval()
    src = torch.randint(3, vocab, (args.batch, 20))
    src[: args.batch // 2, 14:] = PAD  # half the sentences padded
    baseline = load_baseline(args.baseline)
    this_tree = importlib.import_module("attention.decoding")
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, "
          f"{args.new_tokens} new tokens, vocabulary {vocab}, baseline {args.baseline}, "
          f"{args.rounds} alternated rounds, medians")
    for beam in (1, 4):
        compare(f"generate, beam {beam}",
                partial(baseline_generate, baseline, model, src, args.new_tokens, beam),
                partial(model.generate, src, args.new_tokens, BOS, EOS, beam_size=beam),
                args.rounds)
        compare(f"search alone (table step), beam {beam}",
                partial(search, baseline, args.batch, args.new_tokens, beam, vocab),
                partial(search, this_tree, args.batch, args.new_tokens, beam, vocab),
                args.rounds)


if __name__ == "__main__":
    main()
