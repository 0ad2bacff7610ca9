"""Run configuration: four dataclass sections read from YAML, with ``section.key=value`` overrides.

A config file has the sections ``model``, ``data``, ``train`` and ``eval`` (each optional;
missing keys take the defaults below). Every key and every value is checked before any work
starts: an unknown key, a value of the wrong type or a data file that does not exist raises
:class:`ConfigError` with the key (or path) in the message.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._checks import check_positive_int
from ..common.config_files import check_value, parse_override_value, read_yaml_mapping
from ..common.errors import ConfigError
from ..functional import check_softcap
from ..layers import ACTIVATIONS, GLU_ACTIVATIONS, NORMS
from ..local import check_window
from ..multihead import check_kv_heads
from ..positional import POSITIONAL_ENCODINGS
from .precision import PRECISIONS

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "TrainConfig",
    "check_value",
    "load_config",
    "multi30k_files",
]


MULTI30K_SPLITS = {"train": "train", "val": "val", "test": "test_2016_flickr"}


def multi30k_files(root: str | Path, split: str, src_lang: str, tgt_lang: str
                   ) -> tuple[Path, Path]:
    """The source and target files of a Multi30k split (``train``, ``val`` or ``test``)."""
    if split not in MULTI30K_SPLITS:
        raise ValueError(f"split: expected one of {list(MULTI30K_SPLITS)}, got {split!r}")
    stem = Path(root) / MULTI30K_SPLITS[split]
    return Path(f"{stem}.{src_lang}.gz"), Path(f"{stem}.{tgt_lang}.gz")


@dataclass
class ModelConfig:
    """The :class:`attention.Transformer`'s hyperparameters (vocabulary sizes come from data)."""

    d_model: int = 256
    n_heads: int = 4
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    d_ff: int = 1024
    dropout: float = 0.1
    positional: str | None = "sinusoidal"  # null: none (ALiBi's own setting, with alibi)
    max_len: int = 256
    norm_first: bool = True
    activation: str = "gelu"
    # true: the target embedding is the output head; all: the source embedding too (one
    # matrix, which needs one vocabulary: data.shared_vocab or one file in data.tokenizer_files)
    tie_embeddings: bool | str = True
    # Attention variants (attention.MultiHeadAttention): key/value heads (null: n_heads); a
    # sliding window of that many positions on each side (the decoder's self-attention is
    # causal: the left side); global attention in every global_every-th layer with a window;
    # ALiBi; a score cap; QK-norm; and layernorm or rmsnorm in every layer.
    n_kv_heads: int | None = None
    window: int | None = None
    global_every: int | None = None
    alibi: bool = False
    softcap: float | None = None
    qk_norm: bool = False
    norm: str = "layernorm"


@dataclass
class DataConfig:
    """Where the sentence pairs come from and how they are tokenized.

    ``corpus`` is ``toy`` (generated, see :mod:`attention.translation.data.toy`), ``multi30k`` (the
    gzip files under ``root``, languages ``src_lang`` → ``tgt_lang``) or ``parallel`` (the
    user's files: ``train``, ``val`` and ``test`` each a list of two line-aligned text files,
    source then target, or of one tab-separated file).

    Tokenizers: trained on the training split (``tokenizer``, ``vocab_size``), one per side or,
    with ``shared_vocab``, one on both languages' text; or read from ``tokenizer_files``
    instead: ``[file]`` for both sides or ``[source_file, target_file]``, each a ``tokenizers``
    ``tokenizer.json`` or a SentencePiece ``.model`` (see
    :func:`attention.translation.data.tokenizer.load_tokenizer`).
    """

    corpus: str = "toy"
    root: str = "../shared/data/multi30k"
    src_lang: str = "de"
    tgt_lang: str = "en"
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    toy_seed: int = 1234
    toy_train_size: int = 20000
    toy_val_size: int = 500
    toy_test_size: int = 1000
    tokenizer: str = "word"  # word | bpe
    vocab_size: int = 8000  # the most tokens in each side's vocabulary (or the shared one)
    shared_vocab: bool = False  # one tokenizer trained on source and target text
    tokenizer_files: list[str] = field(default_factory=list)  # [both] or [source, target]
    lowercase: bool = False
    max_tokens: int = 100  # training pairs longer than this on either side are dropped

    def split_files(self, split: str) -> list[Path]:
        """The files of ``split`` (``train``, ``val`` or ``test``): Multi30k's source and
        target under ``root``, the user's files for ``parallel``, none for ``toy``."""
        if self.corpus == "multi30k":
            return list(multi30k_files(self.root, split, self.src_lang, self.tgt_lang))
        if self.corpus == "parallel":
            return [Path(path) for path in getattr(self, split)]
        return []


@dataclass
class TrainConfig:
    """The optimisation: AdamW with linear warmup, then a decay.

    ``schedule``: ``inverse_sqrt`` decays as ``√(warmup / step)`` and suits runs of unknown
    length (``max_minutes``); ``cosine`` anneals to zero at ``max_steps``, which it needs.

    ``precision``: the autocast dtype of forward passes (see
    :mod:`attention.translation.precision`). ``auto`` is bf16 on a GPU that computes it
    natively, fp16 with loss scaling on older GPUs (T4, V100), float32 on the CPU; ``bf16``
    runs on the CPU too, ``fp16`` on CUDA only.
    """

    run_dir: str = "runs"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    compile: bool = False
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    lr: float = 7e-4
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    schedule: str = "inverse_sqrt"  # inverse_sqrt | cosine
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    batch_tokens: int = 4096  # target tokens per batch, padding included
    # Batches whose gradients add up to one optimizer step, on each rank: one step trains on
    # ranks × grad_accum_steps batches (keep that product when the number of ranks changes).
    grad_accum_steps: int = 1
    max_steps: int | None = None
    max_epochs: int | None = None
    max_minutes: float | None = None
    log_every: int = 50
    eval_every: int = 500
    threads: int | None = None  # CPU threads for torch; None keeps torch's default
    # Numbered checkpoints (checkpoint_step{N}.pt), for averaging: one every save_every steps
    # (None: at each validation) and at the end, the last keep_last of them kept.
    keep_last: int | None = None
    save_every: int | None = None
    # At the end, average the last average_last numbered checkpoints (checkpoint_average.pt):
    # the test evaluation scores the average instead of checkpoint_best.pt.
    average_last: int | None = None
    # Stop after this many validations in a row without a better BLEU (then loss).
    patience: int | None = None
    tensorboard: bool = False  # also write metrics.jsonl's records to RUN/tensorboard/
    # Under torchrun: the longest a rank waits for the others (rank 0's validation included).
    dist_timeout_minutes: float = 60.0


@dataclass
class EvalConfig:
    """Decoding and scoring: ``val_sentences`` of validation in training, all of test at the end."""

    beam_size: int = 1
    length_penalty: float = 1.0
    max_len_a: float = 1.5  # generate at most a * source_length + b tokens
    max_len_b: int = 10
    val_sentences: int = 500
    batch_size: int = 128  # sentences per decoding batch, at most
    # Padded source tokens per decoding batch, at most (None: batch_size alone decides).
    # Sources are sorted by length, so batches of short sentences hold more of them.
    batch_tokens: int | None = None


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}
# The model's choices are the library's own lists.
CHOICES = {
    ("model", "positional"): POSITIONAL_ENCODINGS,
    ("model", "activation"): (*ACTIVATIONS, *GLU_ACTIVATIONS),
    ("model", "norm"): NORMS,
    ("data", "corpus"): ("toy", "multi30k", "parallel"),
    ("data", "tokenizer"): ("word", "bpe"),
    ("train", "schedule"): ("inverse_sqrt", "cosine"),
    ("train", "precision"): PRECISIONS,
}


@dataclass
class Config:
    """A whole run: its name (the run folder under ``train.run_dir``) and the four sections."""

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.train.run_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, base_dir: Path | None = None,
                  check_files: bool = True, tokenizers_saved: bool = False) -> Config:
        """Build and check a config from plain data (a parsed YAML file or a checkpoint's copy).

        ``base_dir`` resolves relative data paths (see :func:`load_config`); ``check_files``
        off skips the data files' existence (a checkpoint used away from its data);
        ``tokenizers_saved`` skips only ``data.tokenizer_files``' (a resumed run's tokenizers
        come from its checkpoint).
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"config: expected a mapping with sections {sorted(SECTIONS)}, "
                              f"got {type(raw).__name__}")
        unknown = set(raw) - set(SECTIONS) - {"name"}
        if unknown:
            raise ConfigError(f"{sorted(unknown)[0]}: unknown section; expected one of "
                              f"{['name', *SECTIONS]}")
        config = cls(name=check_value("name", raw.get("name", "run"), str))
        for section, section_cls in SECTIONS.items():
            values = raw.get(section) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{section}: expected a mapping of keys to values, got "
                                  f"{type(values).__name__} {values!r}")
            setattr(config, section, _build_section(section, section_cls, values))
        if base_dir is not None:
            config.data = _resolve_paths(config.data, base_dir)
        config.check(check_files=check_files, tokenizers_saved=tokenizers_saved)
        return config

    def override(self, assignments: list[str], check_files: bool = True,
                 tokenizers_saved: bool = False) -> Config:
        """Apply ``section.key=value`` strings (values parsed as YAML) and check the result."""
        return Config.from_dict(apply_overrides(self.to_dict(), assignments),
                                check_files=check_files, tokenizers_saved=tokenizers_saved)

    def check(self, check_files: bool = True, tokenizers_saved: bool = False) -> None:
        """Cross-field checks and file existence, so that a run fails before any work."""
        for (section, key), allowed in CHOICES.items():
            value = getattr(getattr(self, section), key)
            if value not in allowed:
                raise ConfigError(f"{section}.{key}: expected one of {list(allowed)}, "
                                  f"got {value!r}")
        for section in (self.model, self.data, self.train, self.eval):
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                name = f"{_section_name(section)}.{f.name}"
                if f.name in _POSITIVE and value is not None and not value > 0:
                    raise ConfigError(f"{name}: expected a positive number, got {value!r}")
        for name in ("warmup_steps", "weight_decay"):
            if getattr(self.train, name) < 0:
                raise ConfigError(f"train.{name}: expected a number ≥ 0, got "
                                  f"{getattr(self.train, name)!r}")
        if self.eval.max_len_b < 0:
            raise ConfigError(f"eval.max_len_b: expected a number ≥ 0, got {self.eval.max_len_b}")
        try:
            device = torch.device(self.train.device) if self.train.device != "auto" else None
        except RuntimeError:
            raise ConfigError(f"train.device: expected auto, cpu, cuda or cuda:N, got "
                              f"{self.train.device!r}") from None
        if device is not None and device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"train.device: {self.train.device!r} requested, but this "
                              f"machine has no CUDA device (use auto or cpu)")
        m = self.model
        if m.d_model % m.n_heads:
            raise ConfigError(f"model.d_model: expected a multiple of model.n_heads="
                              f"{m.n_heads}, got {m.d_model}")
        t = self.train
        if t.max_steps is None and t.max_epochs is None and t.max_minutes is None:
            raise ConfigError("train.max_steps, train.max_epochs, train.max_minutes: expected "
                              "at least one to be set (a run must end), got none")
        if t.schedule == "cosine" and t.max_steps is None:
            raise ConfigError("train.max_steps: expected a number of steps for "
                              "train.schedule=cosine (it anneals to zero there), got null")
        if not 0 <= m.dropout < 1:
            raise ConfigError(f"model.dropout: expected a probability in [0, 1), got {m.dropout}")
        self._check_attention_variants()
        if not 0 <= self.train.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing: expected a value in [0, 1), got "
                              f"{self.train.label_smoothing}")
        self._check_vocabulary()
        self._check_checkpoints()
        if check_files:
            self._check_data_files(tokenizers_saved)

    def _check_attention_variants(self) -> None:
        """The library's own checks of the variant keys, their errors named ``model.key``."""
        m = self.model
        try:
            check_kv_heads(m.n_kv_heads, m.n_heads)
            check_window(m.window)
            check_softcap(m.softcap)
            if m.global_every is not None:
                check_positive_int("global_every", m.global_every)
                if m.window is None:
                    raise ValueError(f"global_every: expected null without model.window (the "
                                     f"other layers attend within it), got {m.global_every}")
            if m.alibi and m.positional == "rotary":
                raise ValueError("alibi: expected false with positional=rotary (ALiBi "
                                 "replaces position encodings; rotary is one), got true")
        except (TypeError, ValueError) as error:
            raise ConfigError(f"model.{error}") from None

    def _check_vocabulary(self) -> None:
        d, tie = self.data, self.model.tie_embeddings
        if isinstance(tie, str) and tie != "all":
            raise ConfigError(f"model.tie_embeddings: expected true, false or all, got {tie!r}")
        if len(d.tokenizer_files) > 2:
            raise ConfigError(f"data.tokenizer_files: expected [file] (both sides) or "
                              f"[source_file, target_file], got {d.tokenizer_files!r}")
        if d.shared_vocab and len(d.tokenizer_files) == 2:
            raise ConfigError(f"data.shared_vocab: expected one tokenizer file for a shared "
                              f"vocabulary, got two in data.tokenizer_files "
                              f"{d.tokenizer_files!r}")
        if d.tokenizer_files and d.lowercase:
            raise ConfigError("data.lowercase: expected false with data.tokenizer_files (a "
                              "tokenizer read from a file normalizes text as it was built), "
                              "got true")
        one_vocabulary = d.shared_vocab or len(d.tokenizer_files) == 1
        if tie == "all" and not one_vocabulary:
            raise ConfigError("model.tie_embeddings: 'all' ties the source embedding to the "
                              "target's, which needs one vocabulary for both sides: expected "
                              "data.shared_vocab: true or a single file in "
                              "data.tokenizer_files, got neither")

    def _check_checkpoints(self) -> None:
        t = self.train
        if t.average_last is not None and (t.keep_last is None or t.average_last > t.keep_last):
            raise ConfigError(f"train.average_last: expected at most train.keep_last="
                              f"{t.keep_last} (the numbered checkpoints kept to average), got "
                              f"{t.average_last}")
        if t.save_every is not None and t.keep_last is None:
            raise ConfigError(f"train.save_every: expected with train.keep_last (how many "
                              f"numbered checkpoints to keep), got save_every={t.save_every} "
                              f"and keep_last null")

    def _check_data_files(self, tokenizers_saved: bool = False) -> None:
        d = self.data
        for path in [] if tokenizers_saved else d.tokenizer_files:
            if not Path(path).is_file():
                raise ConfigError(f"data.tokenizer_files: file not found: {path}")
        for split in ("train", "val", "test"):
            if d.corpus == "parallel" and len(getattr(d, split)) not in (1, 2):
                raise ConfigError(f"data.{split}: expected [source_file, target_file] "
                                  f"or [tsv_file], got {getattr(d, split)!r}")
            for path in d.split_files(split):
                if path.is_file():
                    continue
                if d.corpus == "multi30k":
                    raise ConfigError(f"data.root: missing file {path} (Multi30k "
                                      f"{split}, {d.src_lang}-{d.tgt_lang})")
                raise ConfigError(f"data.{split}: file not found: {path}")


_POSITIVE = {
    "d_model", "n_heads", "n_encoder_layers", "n_decoder_layers", "d_ff", "max_len",
    "toy_train_size", "toy_val_size", "toy_test_size", "vocab_size", "max_tokens",
    "lr", "batch_tokens", "grad_accum_steps", "max_steps", "max_epochs", "max_minutes",
    "log_every", "eval_every", "clip_norm", "threads", "dist_timeout_minutes", "beam_size",
    "max_len_a", "val_sentences", "batch_size", "keep_last", "save_every", "average_last",
    "patience",
}


def _section_name(section: object) -> str:
    return next(name for name, cls in SECTIONS.items() if isinstance(section, cls))


def _build_section(section: str, section_cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(section_cls)
    known = [f.name for f in dataclasses.fields(section_cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{section}.{key}: unknown key; expected one of {known}")
        kwargs[key] = check_value(f"{section}.{key}", value, hints[key])
    return section_cls(**kwargs)


def _resolve_paths(data: DataConfig, base_dir: Path) -> DataConfig:
    """Relative data paths in a config file are relative to the working directory if they
    exist there, else to the file's own folder (so configs work from anywhere in a clone)."""

    def resolve(path: str) -> str:
        candidate = Path(path)
        if candidate.is_absolute() or candidate.exists():
            return path
        beside = base_dir / candidate
        return str(beside) if beside.exists() else path

    return dataclasses.replace(
        data, root=resolve(data.root), train=[resolve(p) for p in data.train],
        val=[resolve(p) for p in data.val], test=[resolve(p) for p in data.test],
        tokenizer_files=[resolve(p) for p in data.tokenizer_files])


def apply_overrides(raw: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Set ``section.key=value`` strings (values parsed as YAML) in a raw config mapping."""
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        section, dot, name = key.partition(".")
        if not sep or (not dot and key != "name"):
            raise ConfigError(f"override {assignment!r}: expected section.key=value, "
                              f"e.g. train.lr=0.001")
        value = parse_override_value(text)
        if key == "name":
            raw["name"] = value
        elif section not in SECTIONS:
            raise ConfigError(f"{key}: unknown section {section!r}; expected one of "
                              f"{list(SECTIONS)}")
        else:
            if not isinstance(raw.get(section) or {}, dict):
                raise ConfigError(f"{section}: expected a mapping of keys to values, got "
                                  f"{raw[section]!r}")
            raw[section] = {**(raw.get(section) or {}), name: value}
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None, *,
                tokenizers_saved: bool = False) -> Config:
    """Read a YAML config (the run's ``name`` defaults to the file's stem), apply the
    overrides, then check the result (``tokenizers_saved``: see :meth:`Config.from_dict`)."""
    path = Path(path)
    raw = read_yaml_mapping(path, f"a mapping with sections {list(SECTIONS)}")
    raw.setdefault("name", path.stem)
    return Config.from_dict(apply_overrides(raw, overrides or []), base_dir=path.parent,
                            tokenizers_saved=tokenizers_saved)
