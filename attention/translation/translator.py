"""Translate text with a trained model: tokenize, batch, search, detokenize.

``Translator.from_checkpoint("runs/toy_translation/version_0/checkpoint_best.pt").translate([...])``
is the whole use; training uses the same class to score its validation and test splits.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tokenizers import Tokenizer
from torch import Tensor

from ..common.devices import resolve_device
from ..inference import prepared_for_inference
from ..models import Transformer
from .checkpoint import config_from_checkpoint, load_checkpoint, model_from_config
from .config import EvalConfig
from .data.batching import collate
from .data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from .export.folder import load_pretrained
from .precision import autocast, resolve_precision

__all__ = ["Translation", "Translator"]


class Translator:
    """A :class:`Transformer` with its source and target tokenizers and decoding defaults.

    ``precision`` (one of :data:`~attention.translation.precision.PRECISIONS`) is the autocast
    of its searches, resolved on the model's device at each use.
    """

    def __init__(self, model: Transformer, src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer,
                 eval_config: EvalConfig | None = None, *, precision: str = "auto") -> None:
        self.model = model
        self.src_tokenizer = src_tokenizer
        self.tgt_tokenizer = tgt_tokenizer
        self.eval_config = eval_config or EvalConfig()
        resolve_precision(precision, self.device)  # one the device cannot run fails here
        self.precision = precision

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto", *,
                        precision: str | None = None) -> Translator:
        """Load a checkpoint written by training (``checkpoint_best.pt`` or ``_last.pt``).

        ``precision`` defaults to the run's ``train.precision``; a run's ``fp16`` (a choice
        for GPUs without bf16) becomes ``auto`` on a device other than CUDA, float32 there.
        """
        device = resolve_device(device)
        checkpoint = load_checkpoint(path)  # CPU first: the optimizer state is not needed
        config = config_from_checkpoint(checkpoint)
        if precision is None:
            precision = config.train.precision
            if precision == "fp16" and device.type != "cuda":
                precision = "auto"
        try:
            src_tokenizer = Tokenizer.from_str(checkpoint["tokenizers"]["source"])
            tgt_tokenizer = Tokenizer.from_str(checkpoint["tokenizers"]["target"])
            model = model_from_config(config.model, src_tokenizer.get_vocab_size(),
                                      tgt_tokenizer.get_vocab_size(), PAD_ID)
            model.load_state_dict(checkpoint["model"])
        except Exception as error:  # tokenizers raises a bare Exception for a bad JSON
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ValueError(f"{path}: not a complete checkpoint of this package (its "
                             f"tokenizers or weights do not load: {type(error).__name__}: "
                             f"{reason[:200]})") from None
        return cls(model.to(device).eval(), src_tokenizer, tgt_tokenizer, config.eval,
                   precision=precision)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "auto", *,
                        precision: str | None = None) -> Translator:
        """Load a model folder written by :func:`attention.translation.export.save_pretrained`
        (safetensors weights and JSON: nothing in it runs code when loaded).

        ``precision`` defaults to the saved translator's (``fp16`` becomes ``auto`` off CUDA).
        """
        model, src_tokenizer, tgt_tokenizer, eval_config, precision = load_pretrained(
            path, device, precision=precision)
        return cls(model, src_tokenizer, tgt_tokenizer, eval_config, precision=precision)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of ``precision`` on the model's device (``None``: float32)."""
        return resolve_precision(self.precision, self.device)

    def encode(self, sentences: Sequence[str]) -> list[list[int]]:
        """Source token ids, each ending in ``eos`` (cut to fit learned positions)."""
        ids = [e.ids + [EOS_ID] for e in self.src_tokenizer.encode_batch(list(sentences))]
        limit = self.model.encoder.max_positions
        if limit is not None:
            ids = [row if len(row) <= limit else row[:limit - 1] + [EOS_ID] for row in ids]
        return ids

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Target text from generated ids (cut at ``eos``, special tokens dropped)."""
        cut = [list(row[:list(row).index(EOS_ID)]) if EOS_ID in row else list(row)
               for row in ids]
        return self.tgt_tokenizer.decode_batch(cut, skip_special_tokens=True)

    def generate_ids(self, sources: Sequence[Sequence[int]], *, beam_size: int | None = None,
                     length_penalty: float | None = None, **options: Any) -> list[list[int]]:
        """Search for the translation of each id list; returns ids up to and with ``eos``.

        ``options`` are :meth:`search`'s (one output per source: no
        ``num_return_sequences``).
        """
        if "num_return_sequences" in options:
            raise TypeError("num_return_sequences: generate_ids returns one translation per "
                            "source; use search() or translate() for n-best lists")
        # Without scores: greedy search then picks its tokens without a log-softmax per step.
        hypotheses = self._search(sources, beam_size, length_penalty, 1, None, options,
                                  with_scores=False)
        return [ids for ((ids, _score),) in hypotheses]

    def search(self, sources: Sequence[Sequence[int]], *, beam_size: int | None = None,
               length_penalty: float | None = None, num_return_sequences: int = 1,
               seed: int | None = None, **options: Any) -> list[list[tuple[list[int], float]]]:
        """The ``num_return_sequences`` best (or sampled) translations of each id list, as
        ``(ids up to and with eos, score)`` pairs, best first for beam search.

        ``options`` go to :meth:`attention.models.Transformer.generate`
        (``min_new_tokens``, ``no_repeat_ngram_size``, ``do_sample``, ``temperature``,
        ``top_k``, ``top_p``); ``seed`` seeds sampling (``None``: torch's global generator):
        the same sentences, seed and batching give the same samples (a sentence's draws
        depend on the batch it is decoded in). Sources are decoded longest first in batches
        of at most ``eval.batch_size`` sentences and ``eval.batch_tokens`` padded tokens;
        each batch's length limit is ``eval.max_len_a × its longest source + max_len_b``,
        which also caps ``min_new_tokens``. The model's weights are prepared once for all
        the batches (:func:`attention.inference.prepared_for_inference`).
        """
        return self._search(sources, beam_size, length_penalty, num_return_sequences, seed,
                            options, with_scores=True)

    def _search(self, sources: Sequence[Sequence[int]], beam_size: int | None,
                length_penalty: float | None, num_return_sequences: int, seed: int | None,
                options: dict[str, Any], *, with_scores: bool
                ) -> list[list[tuple[list[int], float]]]:
        """:meth:`search`; without ``with_scores`` each score is NaN (not computed)."""
        cfg = self.eval_config
        beam_size = cfg.beam_size if beam_size is None else beam_size
        length_penalty = cfg.length_penalty if length_penalty is None else length_penalty
        device = self.device
        if seed is not None:
            options["generator"] = torch.Generator(device).manual_seed(seed)
        results: list[list[tuple[list[int], float]]] = [[] for _ in sources]
        with prepared_for_inference(self.model):
            for chunk in self._batches(sources):
                self._search_batch(sources, chunk, results, beam_size, length_penalty,
                                   num_return_sequences, options, with_scores)
        return results

    def length_limit(self, longest_source: int) -> int:
        """The most tokens a batch whose longest source has ``longest_source`` ids may
        generate: ``eval.max_len_a × longest_source + eval.max_len_b``, within the decoder's
        learned positions."""
        cfg = self.eval_config
        limit = math.ceil(cfg.max_len_a * longest_source + cfg.max_len_b)
        if self.model.decoder.max_positions is not None:
            limit = min(limit, self.model.decoder.max_positions)
        return limit

    def _search_batch(self, sources: Sequence[Sequence[int]], chunk: list[int],
                      results: list[list[tuple[list[int], float]]], beam_size: int,
                      length_penalty: float, num_return_sequences: int,
                      options: dict[str, Any], with_scores: bool) -> None:
        """Decode the sources ``chunk`` indexes, writing their hypotheses into ``results``."""
        device = self.device
        src = collate([list(sources[i]) for i in chunk], PAD_ID).to(device)
        max_new = self.length_limit(src.shape[1])
        if options.get("min_new_tokens", 0) > max_new:  # no longer than the limit
            options = {**options, "min_new_tokens": max_new}
        with autocast(device, self.autocast_dtype):
            found = self.model.generate(
                src, max_new, BOS_ID, EOS_ID, beam_size=beam_size,
                length_penalty=length_penalty, num_return_sequences=num_return_sequences,
                return_scores=with_scores, **options)
        out, scores = found if with_scores else (found, None)
        rows = zip(out.tolist(), [math.nan] * out.shape[0] if scores is None else scores.tolist(),
                   strict=True)
        for index, group in zip(chunk, _groups(rows, num_return_sequences), strict=True):
            results[index] = [(_until_eos(row), score) for row, score in group]

    def _batches(self, sources: Sequence[Sequence[int]]) -> list[list[int]]:
        """Indices of ``sources``, longest first, cut into batches by ``eval.batch_size``
        and ``eval.batch_tokens``: similar lengths together, and the first batch shows the
        memory a run needs."""
        cfg = self.eval_config
        order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
        batches: list[list[int]] = [[]]
        for index in order:
            batch = batches[-1]
            longest = len(sources[batch[0]]) if batch else len(sources[index])
            full = len(batch) >= cfg.batch_size or (
                cfg.batch_tokens is not None and (len(batch) + 1) * longest > cfg.batch_tokens)
            if batch and full:
                batches.append([])
            batches[-1].append(index)
        return [batch for batch in batches if batch]

    def translate(self, sentences: Sequence[str] | str, *, beam_size: int | None = None,
                  length_penalty: float | None = None, num_return_sequences: int = 1,
                  return_scores: bool = False, seed: int | None = None, **options: Any
                  ) -> list[str] | list[list[Translation]]:
        """Translate sentences (a single string is one sentence).

        Returns one translation per sentence; with ``num_return_sequences`` above 1 or
        ``return_scores``, a list of :class:`Translation` (text, score) per sentence instead:
        beam search's n best, best first, or n samples. The score is the search's
        ``sum log p / length ** length_penalty``. ``beam_size`` 1 is greedy search; both
        default to the checkpoint's ``eval`` section. ``seed`` and ``options``
        (``min_new_tokens``, ``no_repeat_ngram_size``, ``do_sample``, ``temperature``,
        ``top_k``, ``top_p``) are :meth:`search`'s.

        An empty or whitespace-only sentence translates to ``""`` (score 0.0) without
        decoding (the model would still write words for it).
        """
        if isinstance(sentences, str):
            sentences = [sentences]
        n = num_return_sequences
        translations = [[Translation("", 0.0)] * n for _ in sentences]
        real = [i for i, sentence in enumerate(sentences) if sentence.strip()]
        if real:
            hypotheses = self.search(self.encode([sentences[i] for i in real]),
                                     beam_size=beam_size, length_penalty=length_penalty,
                                     num_return_sequences=n, seed=seed, **options)
            texts = iter(self.decode([ids for group in hypotheses for ids, _ in group]))
            for i, group in zip(real, hypotheses, strict=True):
                translations[i] = [Translation(next(texts), score) for _, score in group]
        if n == 1 and not return_scores:
            return [group[0].text for group in translations]
        return translations

    @torch.no_grad()
    def attention(self, sentence: str, *, beam_size: int | None = None
                  ) -> dict[str, list[str] | Tensor]:
        """Translate ``sentence`` and return the attention behind it, for plotting.

        Returns ``source_tokens`` (with ``<eos>``), ``target_tokens`` (the generated tokens,
        ``<eos>`` included: each is the token predicted at that decoder step),
        ``encoder`` ``(layers, heads, S, S)`` self-attention and ``cross``
        ``(layers, heads, T, S)`` cross-attention, the latter with the translation fed
        back to the decoder (teacher forcing on the model's own output).
        """
        if not sentence.strip():
            raise ValueError("sentence: expected a sentence to translate, got an empty one")
        src_ids = self.encode([sentence])[0]
        out_ids = self.generate_ids([src_ids], beam_size=beam_size)[0]
        device = self.device
        src = torch.tensor([src_ids], device=device)
        tgt_in = torch.tensor([[BOS_ID, *out_ids[:-1]]] if out_ids else [[BOS_ID]], device=device)
        was_training = self.model.training
        self.model.eval()
        try:
            memory, encoder = self.model.encode(src, return_attention=True)
            _, cross = self.model.decode(tgt_in, memory, self.model.padding_mask(src),
                                         return_attention=True)
        finally:
            self.model.train(was_training)
        target_ids = out_ids or [EOS_ID]
        return {
            "source_tokens": [self.src_tokenizer.id_to_token(i) for i in src_ids],
            "target_tokens": [self.tgt_tokenizer.id_to_token(i) for i in target_ids],
            "encoder": torch.stack(encoder)[:, 0].float().cpu(),
            "cross": torch.stack(cross)[:, 0].float().cpu(),
        }


class Translation(NamedTuple):
    """One translation of a sentence and its search score (``sum log p / length ** lp``)."""

    text: str
    score: float


def _until_eos(row: list[int]) -> list[int]:
    """Generated ids up to and with ``eos`` (padding dropped when there is none)."""
    return row[:row.index(EOS_ID) + 1] if EOS_ID in row else [t for t in row if t != PAD_ID]


def _groups(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive groups of ``size`` items: a sentence's ``num_return_sequences`` rows."""
    rows = iter(rows)
    while group := list(itertools.islice(rows, size)):
        yield group
