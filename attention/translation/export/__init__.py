"""Models that ship: a trained translator written for others to load.

- :func:`save_pretrained` / :func:`load_pretrained` (``Translator.from_pretrained``): a
  model folder of safetensors weights and JSON (config, tokenizers), no pickle
  (:mod:`.folder`).
- :func:`export_ctranslate2`: a CTranslate2 model folder, optionally quantized, built with
  CTranslate2's own spec API (:mod:`.ctranslate2`; needs the ``ctranslate2`` extra).

``attention-export --checkpoint RUN/checkpoint_best.pt --out DIR [--format ctranslate2]``
does either from a training checkpoint.
"""

from .ctranslate2 import ctranslate2_spec, export_ctranslate2
from .folder import FORMAT, load_pretrained, save_pretrained
from .model_config import model_config_of

__all__ = ["FORMAT", "ctranslate2_spec", "export_ctranslate2", "load_pretrained",
           "model_config_of", "save_pretrained"]
