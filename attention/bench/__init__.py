"""The benchmark harness behind ``attention-bench``: this package's Encoder against
torch.nn.TransformerEncoder and x-transformers (needs the ``bench`` extra).

What is measured
----------------
One *cell* is a config × sequence length × dtype × pass × case × contender.

Contenders, all of the config's size, dropout 0, built by :func:`.contenders.build_contenders`:

- ``ours-explicit``: :class:`attention.Encoder` on the textbook attention math
  (``attention_backend("explicit")``);
- ``ours-fused``: the same Encoder on its default path (fused SDPA);
- ``ours-compiled``: ``torch.compile`` of the same Encoder (``dynamic=False``: a graph per
  shape, compiled during the warm-up);
- ``ours-sdpa-math``, ``-flash``, ``-efficient``, ``-cudnn`` (only when asked for by name):
  the same Encoder with ``F.scaled_dot_product_attention`` forced to that kernel, to compare
  the kernels (a kernel the device lacks is recorded as an error);
- ``torch-nobias``: ``nn.TransformerEncoder`` (pre-norm, batch first, ``bias=False``, a
  final LayerNorm as ours has), carrying our weights (``compat.to_torch``);
- ``torch-bias``: the same with biases (torch's inference fast path needs them);
- ``x-transformers``: its ``Encoder`` (pre-norm, no biases, fused attention), when installed.

Passes: ``inference`` (``eval()`` under ``torch.inference_mode()``) and ``training``
(``train()``, forward, then backward of the mean square of the outputs at real positions
with respect to the input and every weight; gradients are set to ``None`` before each run).

Cases: ``dense`` (no mask) and ``padded``: a ``(B, L)`` key padding mask, ``True`` at
padding (torch.nn's meaning; x-transformers gets ``~mask``), a ``padding`` fraction of the
positions padded, with sequence lengths spread evenly from ``L·(1 - 2·padding)`` to ``L``
(right padding): ``L/2`` to ``L`` for the default 0.25.

How
---
The contenders of one (length, dtype, pass, case) live in one process. Each runs ``warmup``
times (which covers compilation), then ``repeats`` rounds run every contender once,
alternating run by run; each round starts one contender later, so that none always follows
the same neighbour. A run is timed with ``time.perf_counter`` on the CPU, with CUDA events
after a synchronize on the GPU. Per cell:

- every run's time; the median, min, max and interquartile range;
- tokens/s, counting real tokens only (padding is not work done);
- FLOPs counted from the shape (:func:`.workload.encoder_flops`, useful work only), FLOP/s, and MFU:
  FLOP/s over the best time of a square matmul (2048³ on the CPU, 8192³ on CUDA) measured
  in the same run and dtype;
- ratios, for each pair of one of ours and one peer: per round, peer time / ours time
  (> 1: ours is faster), their list and median; the table shows them against the faster
  torch.nn contender of the cell and against x-transformers;
- memory, as what a run adds above the built model and its input. CUDA: the peak allocated
  during a timed run minus what was allocated before it. CPU: a subprocess builds only that
  cell's contender and input, reads its resident set (``VmRSS``), warms up, resets the peak
  (``/proc/self/clear_refs``) where Linux allows it, runs, and reads the peak (``VmHWM``).
  (Not ``ru_maxrss``: a child of ``subprocess`` inherits its parent's peak in it.)

An out-of-memory is recorded as ``"oom"`` for its cell, any other failure (a compile that
fails) as ``"error"`` with its message, and the run goes on. Beside the timings, the JSON
records the largest difference between ours and ``torch-nobias`` (same weights) on real
positions, per length, dtype and case: a correctness check.

Results: a table on the terminal, and ``{device}-{config}-{date}.json`` and ``.md`` (and a
log-log ``.png`` of time and memory against length when the config has several lengths).

Modules, one concern each, in the order data flows
--------------------------------------------------
``config`` (the choices, :class:`BenchConfig`, ``--contenders``) → ``workload`` (input,
cases, FLOPs) → ``contenders`` (the modules and their forwards) → ``timing`` (runs, rounds,
failures, matmul peak), ``memory`` (CPU peak RSS, a child process), ``correctness`` (ours
against torch-nobias) → ``cells`` (statistics, rates, ratios) → ``runner`` (the loops, the
report) → ``environment`` (machine, versions, git), ``report`` (table, Markdown, files),
``plot`` (the PNG) → ``cli`` (arguments only). Import from the module that holds a name;
this file imports none of them, so that ``python -m attention.bench.memory`` (the memory
child) loads each module once.

The kit of every script in ``benchmarks/``
------------------------------------------
``kit`` gathers, in one import, what the harness above and the scripts share: ``clock``
(a call timed on its device), ``rounds`` (contenders in alternated rounds, medians,
per-round ratios), ``environment`` (the record with the git commit and the command line),
``writer`` (``{stem}.json`` and ``{stem}.md``, atomically), ``subprocesses`` (a child with a
timeout that takes its process group with it) and ``arguments`` (checks that name the
argument).
"""
