"""A trained translator as a model folder: safetensors weights and JSON, no pickle.

``save_pretrained(translator, "model")`` writes::

    model/
      config.json              format, model and eval configs, vocabulary sizes,
                               special token ids, tied weights, precision
      model.safetensors        the state dict (a tied weight stored once)
      source_tokenizer.json    the tokenizers, as tokenizers' own JSON
      target_tokenizer.json

and ``Translator.from_pretrained("model")`` reads it back. Nothing in the folder runs code
when loaded: unlike a ``torch.save`` checkpoint it holds no pickle, and it holds no
optimizer state, so it is the form to hand on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from tokenizers import Tokenizer
from torch import nn

from ...common.devices import resolve_device
from ...common.files import write_atomic
from ...models import Transformer
from ..checkpoint import model_from_config
from ..config import (
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    check_value,
)
from ..data.tokenizer import PAD_ID, SPECIAL_TOKENS
from .atomic_folder import write_folder_atomic
from .model_config import model_config_of, tied_parameters

if TYPE_CHECKING:
    from ..translator import Translator

__all__ = ["FILES", "FORMAT", "PretrainedParts", "load_pretrained", "save_pretrained"]

FORMAT = "attention-translation-model/1"
CONFIG, WEIGHTS = "config.json", "model.safetensors"
TOKENIZERS = {"source": "source_tokenizer.json", "target": "target_tokenizer.json"}
FILES = (CONFIG, WEIGHTS, *TOKENIZERS.values())


def save_pretrained(translator: Translator, out_dir: str | os.PathLike, *,
                    overwrite: bool = False) -> Path:
    """Write ``translator`` as a model folder at ``out_dir`` (atomically; see the module).

    An existing non-empty ``out_dir`` raises ``FileExistsError`` unless ``overwrite``.
    Returns the folder's path.
    """
    model = _unwrapped(translator.model)
    config = folder_config(translator)
    tensors = {name: tensor.detach().cpu().contiguous()
               for name, tensor in model.state_dict().items()
               if name not in config["tied_weights"]}
    tokenizers = {"source": translator.src_tokenizer, "target": translator.tgt_tokenizer}

    def fill(folder: Path) -> None:
        _write_bytes(folder / CONFIG, (json.dumps(config, indent=2) + "\n").encode())
        _write_bytes(folder / WEIGHTS, safetensors_bytes(tensors, metadata={"format": FORMAT}))
        for side, name in TOKENIZERS.items():
            _write_bytes(folder / name, tokenizers[side].to_str().encode())

    return write_folder_atomic(out_dir, fill, overwrite=overwrite)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (its state dict's keys are prefixed)."""
    return getattr(model, "_orig_mod", model)


def folder_config(translator: Translator) -> dict[str, Any]:
    """What ``config.json`` holds for ``translator``."""
    model = _unwrapped(translator.model)
    return {
        "format": FORMAT,
        "model": dataclasses.asdict(model_config_of(model)),
        "eval": dataclasses.asdict(translator.eval_config),
        "precision": translator.precision,
        "src_vocab_size": model.src_vocab_size,
        "tgt_vocab_size": model.tgt_vocab_size,
        "special_tokens": {token: token_id for token_id, token in enumerate(SPECIAL_TOKENS)},
        "tied_weights": tied_parameters(model),
    }


def _write_bytes(path: Path, data: bytes) -> None:
    write_atomic(path, lambda file: file.write(data))


class PretrainedParts(NamedTuple):
    """What a model folder holds, checked and loaded: ``Translator(*parts[:4],
    precision=parts.precision)`` is the translator it was saved from."""

    model: Transformer
    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer
    eval_config: EvalConfig
    precision: str


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "auto", *,
                    precision: str | None = None) -> PretrainedParts:
    """Read a folder written by :func:`save_pretrained`: the model (on ``device``, in
    evaluation mode), its tokenizers, eval config and precision.
    :meth:`Translator.from_pretrained <attention.translation.translator.Translator.from_pretrained>`
    builds the translator from them.

    ``precision`` defaults to the saved translator's; a saved ``fp16`` (for GPUs without
    bf16) becomes ``auto`` on a device other than CUDA. Raises ``FileNotFoundError`` when
    the folder or one of its files is missing, and ``ValueError`` naming the file and what
    is wrong when it is not a model folder of this format or its parts do not fit together.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"path: model folder not found: {folder}")
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: not a model folder of this package (missing "
                                f"{', '.join(missing)}; expected {', '.join(FILES)})")
    device = resolve_device(device)
    config = _read_config(folder / CONFIG)
    model_config = _section(ModelConfig, config, "model", folder / CONFIG)
    eval_config = _section(EvalConfig, config, "eval", folder / CONFIG)
    # Ranges and choices, as a run's config is checked (eval.batch_size > 0, …); a folder
    # holds no training settings, so the check gets a training section that ends, and no
    # data settings: one tokenizer for both sides when all embeddings are tied.
    try:
        Config(model=model_config, eval=eval_config, train=TrainConfig(max_steps=1),
               data=DataConfig(shared_vocab=model_config.tie_embeddings == "all"),
               ).check(check_files=False)
    except ConfigError as error:
        raise ValueError(f"{folder / CONFIG}: {error}") from None
    src_tokenizer, tgt_tokenizer = (_read_tokenizer(folder / TOKENIZERS[side])
                                    for side in ("source", "target"))
    _check_vocabularies(folder, config, src_tokenizer, tgt_tokenizer)
    try:
        model = model_from_config(model_config, config["src_vocab_size"],
                                  config["tgt_vocab_size"], PAD_ID)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{folder / CONFIG}: the model config does not build a model: "
                         f"{error}") from None
    _load_weights(model, folder / WEIGHTS, config["tied_weights"])
    if precision is None:
        precision = config.get("precision", "auto")
        if precision == "fp16" and device.type != "cuda":
            precision = "auto"
    return PretrainedParts(model.to(device).eval(), src_tokenizer, tgt_tokenizer, eval_config,
                           precision)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: expected JSON, got unreadable text ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: expected format {FORMAT!r}, got {config.get('format')!r}")
    expected = {"model": dict, "eval": dict, "src_vocab_size": int, "tgt_vocab_size": int,
                "special_tokens": dict, "tied_weights": dict}
    for key, kind in expected.items():
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
            raise ValueError(f"{path}: {key}: expected a {kind.__name__}, got "
                             f"{config.get(key)!r}")
    return config


def _section(section_type: type, config: dict[str, Any], name: str, path: Path) -> Any:
    """A config dataclass from ``config[name]``, each value checked against its field."""
    hints = typing.get_type_hints(section_type)
    values = config[name]
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"{path}: {name}.{unknown[0]}: unknown key; expected one of "
                         f"{list(hints)}")
    try:
        return section_type(**{key: check_value(f"{name}.{key}", value, hints[key])
                               for key, value in values.items()})
    except ConfigError as error:
        raise ValueError(f"{path}: {error}") from None


def _read_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as error:  # tokenizers raises a bare Exception for a bad JSON
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"{path}: not a tokenizer's JSON ({type(error).__name__}: "
                         f"{reason[:200]})") from None


def _check_vocabularies(folder: Path, config: dict[str, Any], src_tokenizer: Tokenizer,
                        tgt_tokenizer: Tokenizer) -> None:
    expected_special = {token: token_id for token_id, token in enumerate(SPECIAL_TOKENS)}
    if config["special_tokens"] != expected_special:
        raise ValueError(f"{folder / CONFIG}: special_tokens: expected {expected_special} (the "
                         f"ids this package decodes with), got {config['special_tokens']}")
    for side, tokenizer, key in (("source", src_tokenizer, "src_vocab_size"),
                                 ("target", tgt_tokenizer, "tgt_vocab_size")):
        path = folder / TOKENIZERS[side]
        if tokenizer.get_vocab_size() != config[key]:
            raise ValueError(f"{path}: expected {config[key]} tokens ({key} in {CONFIG}), got "
                             f"{tokenizer.get_vocab_size()}")
        ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
        if ids != list(range(len(SPECIAL_TOKENS))):
            raise ValueError(f"{path}: expected the special tokens {SPECIAL_TOKENS} at ids "
                             f"0-{len(SPECIAL_TOKENS) - 1}, got ids {ids}")


def _load_weights(model: Transformer, path: Path, tied_weights: dict[str, str]) -> None:
    """Load ``path`` into ``model``: every weight present, of the model's shape, and the
    model's tied weights the ones the folder says are tied."""
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        tensors = load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own error types for a bad file
        raise ValueError(f"{path}: not a safetensors file ({type(error).__name__}: "
                         f"{str(error).strip()[:200]})") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: expected format {FORMAT!r} in its metadata, got "
                         f"{metadata.get('format')!r}")
    model_tied = tied_parameters(model)
    if tied_weights != model_tied:
        raise ValueError(f"{path}: expected tied weights {model_tied} (as the config builds "
                         f"the model), got {tied_weights}")
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()
                if name not in model_tied}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [f"{name} {tuple(tensors[name].shape)} (expected {shape})"
                  for name, shape in expected.items()
                  if name in tensors and tuple(tensors[name].shape) != shape]
    problems = ([f"missing {', '.join(missing[:5])}"] if missing else []) + \
        ([f"unexpected {', '.join(unexpected[:5])}"] if unexpected else []) + \
        ([f"shapes {', '.join(mismatched[:5])}"] if mismatched else [])
    if problems:
        raise ValueError(f"{path}: weights do not match the model of its config: "
                         f"{'; '.join(problems)}")
    for name, source in tied_weights.items():
        tensors[name] = tensors[source]
    model.load_state_dict(tensors)
