"""The translation application built on the library: configs, data, training, checkpoints,
torchrun, the translator, metrics, plots and the command-line entry points (needs the
``train`` extra: tokenizers, sacrebleu, tqdm, matplotlib, pyyaml).

The library (``attention`` and its core modules) never imports this package.
"""
