"""Greedy and beam search keep their state on the device: the same results as the searches
that read every step back to the host (kept here as the reference), whenever the stop
flag is read, and on CUDA a number of host synchronisations that does not grow with the
steps."""

import warnings

import pytest
import torch

from attention import Transformer, beam_search, decoding, greedy_search
from attention.decoding import sequence_score

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BOS, EOS, PAD = 1, 2, 0
# The CUDA-only tests take ``device`` from this list, empty without CUDA (pytest then skips
# them): parametrized on the device like the others, `make gpu-check` selects them too.
CUDA = ["cuda"] if torch.cuda.is_available() else []


# The searches as they were before their state moved to the device (commit 5c7034c): a host
# round trip per step, Python lists of finished hypotheses.

def reference_greedy_search(step, batch, bos_id, eos_id, pad_id, max_new_tokens, *, device):
    last = torch.full((batch, 1), bos_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    generated = []
    for _ in range(max_new_tokens):
        next_ids = step(last).argmax(dim=-1).masked_fill(finished, pad_id)
        generated.append(next_ids)
        finished = finished | (next_ids == eos_id)
        last = next_ids.unsqueeze(-1)
        if bool(finished.all()):
            break
    return torch.stack(generated, dim=1)


def reference_beam_search(step, reorder, batch, bos_id, eos_id, pad_id, max_new_tokens,
                          beam_size, length_penalty, *, device):
    k = beam_size
    rows = torch.arange(batch, device=device).unsqueeze(-1) * k
    last = torch.full((batch * k, 1), bos_id, dtype=torch.long, device=device)
    history = torch.empty((batch * k, 0), dtype=torch.long, device=device)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    hypotheses = [[] for _ in range(batch)]
    done = [False] * batch

    def score(log_prob, length):
        return log_prob / (length**length_penalty)

    for t in range(max_new_tokens):
        log_probs = step(last).float()
        vocab = log_probs.shape[-1]
        candidates = (scores.reshape(-1, 1) + log_probs).reshape(batch, k * vocab)
        top_scores, top_index = candidates.topk(min(2 * k, k * vocab), dim=-1)
        top_beam, top_token = top_index // vocab, top_index % vocab
        continuing = top_scores.masked_fill(top_token == eos_id, float("-inf"))
        keep = continuing.topk(k, dim=-1).indices
        scores = continuing.gather(-1, keep)
        s, beam, token = top_scores.tolist(), top_beam.tolist(), top_token.tolist()
        for b in range(batch):
            if done[b]:
                continue
            for rank in range(k):
                if token[b][rank] == eos_id and s[b][rank] > float("-inf"):
                    prefix = history[b * k + beam[b][rank]].tolist()
                    hypotheses[b].append((score(s[b][rank], t + 1), prefix + [eos_id]))
            hypotheses[b] = sorted(hypotheses[b], key=lambda h: h[0], reverse=True)[:k]
        best_alive = scores.max(dim=-1).values.tolist()
        for b in range(batch):
            if not done[b]:
                done[b] = len(hypotheses[b]) == k and \
                    hypotheses[b][-1][0] >= score(best_alive[b], t + 1)
        if all(done):
            break
        source_rows = (rows + top_beam.gather(-1, keep)).reshape(-1)
        last = top_token.gather(-1, keep).reshape(-1, 1)
        history = torch.cat((history.index_select(0, source_rows), last), dim=1)
        reorder(source_rows)
    else:
        for b in range(batch):
            if not done[b]:
                for j in range(k):
                    if scores[b, j] > float("-inf"):
                        hypotheses[b].append((score(float(scores[b, j]), max_new_tokens),
                                              history[b * k + j].tolist()))
    best = [max(h, key=lambda x: x[0])[1] for h in hypotheses]
    out = torch.full((batch, max(len(h) for h in best)), pad_id, dtype=torch.long)
    for b, tokens in enumerate(best):
        out[b, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return out.to(device)


class TableModel:
    """A step function whose next-token scores depend on each row's whole prefix (a hash
    carried per row, reordered as a KV cache is). Few distinct rows of whole-number scores
    (the searches need no normalised distribution), so that hypotheses of different
    lengths often score exactly the same: the ties test the order among equal scores."""

    def __init__(self, rows, seed, device, vocab=7, states=3, eos_bias=0.0):
        generator = torch.Generator().manual_seed(seed)
        scores = torch.randint(-3, 1, (states, vocab), generator=generator).float()
        scores[:, EOS] += eos_bias
        self.table = scores.to(device)
        self.state = torch.zeros(rows, dtype=torch.long, device=device)
        self.states = states
        self.calls = 0

    def __call__(self, last):
        self.calls += 1
        self.state = (self.state * 7 + last[:, 0]) % self.states
        return self.table[self.state]

    def reorder(self, index):
        self.state = self.state.index_select(0, index)


def searches_agree(device, seed, batch, beam_size, max_new_tokens, length_penalty, eos_bias):
    """The reference and the search under test on two copies of one TableModel."""
    rows = batch * beam_size
    ours, reference = (TableModel(rows, seed, device, eos_bias=eos_bias) for _ in range(2))
    if beam_size == 1:
        out = greedy_search(ours, batch, BOS, EOS, PAD, max_new_tokens, device=device)
        expected = reference_greedy_search(reference, batch, BOS, EOS, PAD, max_new_tokens,
                                           device=device)
    else:
        out = beam_search(ours, ours.reorder, batch, BOS, EOS, PAD, max_new_tokens, beam_size,
                          length_penalty, device=device)
        expected = reference_beam_search(reference, reference.reorder, batch, BOS, EOS, PAD,
                                         max_new_tokens, beam_size, length_penalty,
                                         device=device)
    assert out.device.type == torch.device(device).type
    assert out.tolist() == expected.tolist(), (seed, batch, beam_size, max_new_tokens,
                                               length_penalty, eos_bias)
    return ours.calls, reference.calls


CASES = [(seed, batch, max_new_tokens, length_penalty, eos_bias)
         for seed in range(12)
         for batch, max_new_tokens in ((1, 3), (3, 6), (5, 9))
         for length_penalty in (0.0, 0.6, 1.0)
         for eos_bias in (0.0, 1.0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beam_size", [1, 2, 3, 5])
def test_the_searches_give_what_the_host_round_trip_versions_gave(device, beam_size):
    # On CUDA a quarter of the cases: each step there is a few launches, not a few µs.
    cases = CASES if device == "cpu" else [case for case in CASES if case[0] % 4 == 0]
    calls = [searches_agree(device, *case[:2], beam_size, *case[2:]) for case in cases]
    if device == "cpu":  # the flag is read every step: no extra step
        assert all(ours == reference for ours, reference in calls)
    # Not a trivial case: some searches stop early, some run to the length limit.
    max_steps = [case[2] for case in cases]
    assert any(c[1] < m for c, m in zip(calls, max_steps, strict=True))
    assert any(c[1] == m for c, m in zip(calls, max_steps, strict=True))


def test_finished_scores_are_exactly_the_sequence_scores_of_the_float32_log_probs():
    """Beam search ranked Python floats made from float32 values; on the device the same
    division in float64 gives the same numbers (float32 division would round otherwise)."""
    log_probs = torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 20
    for length, length_penalty in [(3, 0.6), (7, 1.0), (11, 1.3), (5, 0)]:
        finished = decoding._Finished(1, 1, 1, length_penalty, PAD, "cpu")
        assert finished._score(log_probs, length).tolist() == \
            [sequence_score(x, length, length_penalty) for x in log_probs.tolist()]


class LateFlag:
    """A stop flag read ``lag`` calls late, as a deferred copy on CUDA can be."""

    lag = 3

    def __init__(self, device):
        self.seen = []

    def __call__(self, flag):
        self.seen.append(bool(flag))
        return len(self.seen) > self.lag and self.seen[-1 - self.lag]


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_stop_flag_read_late_changes_nothing_but_the_steps_taken(monkeypatch, beam_size):
    monkeypatch.setattr(decoding, "_StopFlag", LateFlag)
    calls = [searches_agree("cpu", seed, 4, beam_size, 12, 1.0, 1.0) for seed in range(10)]
    late = [(ours, reference) for ours, reference in calls if reference < 12]
    assert late and all(ours == min(reference + LateFlag.lag, 12) for ours, reference in late)


def test_the_stop_flag_on_the_cpu_is_read_at_once():
    stop = decoding._StopFlag("cpu")
    assert not stop(torch.tensor(False)) and stop(torch.tensor(True))


@pytest.mark.parametrize("device", CUDA)
def test_the_stop_flag_on_cuda_is_read_late_but_read(device):
    stop = decoding._StopFlag(device, max_lag=4)
    assert not stop(torch.tensor(True, device=device))  # never at the call that gives it
    answers = [stop(torch.tensor(False, device=device)) for _ in range(4)]
    assert answers.count(True) == 1  # within max_lag calls
    assert not stop(torch.tensor(False, device=device))


def count_syncs(fn):
    """How many host synchronisations ``fn`` makes on CUDA (torch's sync debug mode counts
    stream synchronisations and blocking copies, not waits on an event)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("beam_size", [1, 4])
def test_the_searches_synchronize_a_fixed_number_of_times_on_cuda(device, beam_size):
    def run(max_new_tokens):
        model = TableModel(3 * beam_size, 0, device, eos_bias=-100.0)  # never ends early
        if beam_size == 1:
            return count_syncs(lambda: greedy_search(model, 3, BOS, EOS, PAD, max_new_tokens,
                                                     device=device))
        return count_syncs(lambda: beam_search(model, model.reorder, 3, BOS, EOS, PAD,
                                               max_new_tokens, beam_size, device=device))

    run(4)  # warm-up: first-use allocations
    assert run(4) == run(24) <= 1  # the result's width, read once


@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("beam_size", [1, 4])
def test_generate_synchronizes_a_fixed_number_of_times_on_cuda(device, beam_size):
    torch.manual_seed(0)
    model = Transformer(20, 16, d_model=16, n_heads=2, n_encoder_layers=1, n_decoder_layers=2,
                        dropout=0.0, pad_id=PAD).to(device).eval()
    eos = torch.tensor([EOS], device=device)
    model.lm_head.register_forward_hook(  # EOS never wins: every run takes all its steps
        lambda module, args, out: out.index_fill(-1, eos, -1e4))
    src = torch.randint(3, 20, (4, 7), device=device)
    src[1, 5:] = PAD

    def syncs(max_new_tokens):
        return count_syncs(lambda: model.generate(src, max_new_tokens, BOS, EOS,
                                                  beam_size=beam_size))

    syncs(4)  # warm-up
    assert syncs(4) == syncs(20)


@pytest.mark.parametrize("beam_size", [2, 3, 5])
def test_a_first_step_on_one_row_per_sentence_and_dropped_sentences_change_nothing(beam_size):
    """``expand_after_first_step``: the first step sees ``batch`` rows, which the first
    reorder grows to ``batch * beam_size``; ``drop_finished``: done sentences' rows leave.
    The results are the full search's. (This table's sentences are all alike, so none is
    done before the others: tests/test_generate_options.py sees a model's rows shrink.)"""
    for seed, batch, max_new_tokens, length_penalty, eos_bias in CASES[::3]:
        full = TableModel(batch * beam_size, seed, "cpu", eos_bias=eos_bias)
        args = (batch, BOS, EOS, PAD, max_new_tokens, beam_size, length_penalty)
        expected = beam_search(full, full.reorder, *args, return_scores=True)
        for expand, drop in ((True, False), (False, True), (True, True)):
            model = TableModel(batch * (1 if expand else beam_size), seed, "cpu",
                               eos_bias=eos_bias)
            rows_seen = []

            def step(last, model=model, rows_seen=rows_seen):
                rows_seen.append(last.shape[0])
                return model(last)

            out = beam_search(step, model.reorder, *args, return_scores=True,
                              expand_after_first_step=expand, drop_finished=drop)
            assert out[0].tolist() == expected[0].tolist()
            assert out[1].tolist() == expected[1].tolist()
            assert rows_seen[0] == batch * (1 if expand else beam_size)
            assert max(rows_seen[1:], default=0) <= batch * beam_size
            if not drop:
                assert set(rows_seen[1:]) <= {batch * beam_size}
