"""Where runs live: each training run in a folder of its own, so no run replaces another.

A config's ``train.run_dir/NAME`` (:attr:`Config.run_path`) holds one folder per run,
``version_0``, ``version_1``, … (as Lightning's ``version_N``): a new run takes the next
number, ``--resume`` continues the latest (or a folder named), and the commands that read a
model (``attention-translate``, ``attention-export``, ``attention-plot-attention``) take
``runs/NAME`` to mean its latest run's model. A folder from before versions, whose
checkpoints sit in ``runs/NAME`` itself, is read as a run of its own.
"""

from __future__ import annotations

import re
from pathlib import Path

from .checkpoint import AVERAGE, load_checkpoint
from .config import Config, apply_overrides

__all__ = ["VERSION_PREFIX", "config_of_run", "latest_run", "model_checkpoint", "new_run",
           "resumed_run", "run_versions"]

VERSION_PREFIX = "version_"
_VERSION = re.compile(rf"{VERSION_PREFIX}(\d+)")
LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"


def run_versions(root: str | Path) -> list[tuple[int, Path]]:
    """The runs in ``root``, as ``(number, folder)`` from the first."""
    root = Path(root)
    found = [(int(match.group(1)), path) for path in root.glob(f"{VERSION_PREFIX}*")
             if path.is_dir() and (match := _VERSION.fullmatch(path.name))]
    return sorted(found)


def new_run(root: str | Path) -> Path:
    """A new, empty run folder in ``root``: ``version_N`` with N one past the highest there.
    Created here, so that two runs started together cannot take the same one."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    versions = run_versions(root)
    number = versions[-1][0] + 1 if versions else 0
    while True:
        folder = root / f"{VERSION_PREFIX}{number}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            number += 1


def latest_run(root: str | Path) -> Path | None:
    """The latest run in ``root`` that saved a checkpoint (``checkpoint_last.pt``), or
    ``root`` itself when it is a run (one from before versions, or a version folder);
    ``None`` when there is none."""
    root = Path(root)
    if (root / LAST).is_file():
        return root
    for _, folder in reversed(run_versions(root)):
        if (folder / LAST).is_file():
            return folder
    return None


def resumed_run(root: str | Path, resume: bool | str | Path) -> Path:
    """The run folder ``--resume`` continues: the latest in ``root`` (``resume=True``), or
    the folder given: a run (``runs/NAME/version_N``) or a run's name folder (``runs/NAME``,
    meaning its latest run), as the commands that read models take. Raises
    FileNotFoundError, naming what was looked for, when there is no ``checkpoint_last.pt``."""
    if resume is True:
        folder = latest_run(root)
        if folder is None:
            raise FileNotFoundError(f"--resume: expected a run with {LAST} in {root} (or in a "
                                    f"{VERSION_PREFIX}N folder there), found none; start "
                                    f"without --resume")
        return folder
    folder = latest_run(resume) if Path(resume).is_dir() else None
    if folder is None:
        raise FileNotFoundError(f"--resume: expected a run folder holding {LAST} (or runs/NAME, "
                                f"whose latest {VERSION_PREFIX}N holds one), got {resume}")
    return folder


def model_checkpoint(path: str | Path) -> Path:
    """The checkpoint a model-reading command loads for ``path``: a file is itself; a run
    folder (or ``runs/NAME``, meaning its latest run) gives the run's averaged checkpoint
    where there is one (``train.average_last``), else its best."""
    path = Path(path)
    if not path.is_dir():
        return path  # a file (or a missing path: the loader says so)
    run = latest_run(path)
    if run is None:
        raise FileNotFoundError(f"--checkpoint: expected a checkpoint file or a run folder, "
                                f"got {path}, which holds no run ({LAST} in it or in a "
                                f"{VERSION_PREFIX}N folder)")
    for name in (AVERAGE, BEST):
        if (run / name).is_file():
            return run / name
    raise FileNotFoundError(f"--checkpoint: the run {run} has no {AVERAGE} or {BEST} yet")


def config_of_run(folder: str | Path, overrides: list[str] | None = None) -> Config:
    """The config a run was trained with (its ``checkpoint_last.pt``'s copy), with
    ``overrides`` applied: what ``attention-train --resume RUN_FOLDER`` continues with when
    given no ``--config``. Its tokenizers come from the checkpoint, so ``data.tokenizer_files``
    need not exist any more."""
    checkpoint = load_checkpoint(resumed_run(folder, resume=folder) / LAST)
    return Config.from_dict(apply_overrides(checkpoint["config"], overrides or []),
                            tokenizers_saved=True)
