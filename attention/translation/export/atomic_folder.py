"""Folders written whole or not at all: filled beside their place, then renamed onto it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["check_writable", "write_folder_atomic"]


# What an exported model folder holds (ours: JSON, safetensors; CTranslate2's: model.bin,
# JSON or text vocabularies). Only a folder of such files may be replaced.
EXPORT_SUFFIXES = {".json", ".safetensors", ".bin", ".txt"}


def check_writable(path: Path, overwrite: bool) -> None:
    """Raise ``FileExistsError`` when ``path`` holds something that ``overwrite`` off keeps,
    or, with ``overwrite``, something that is not an earlier export (a run's folder with its
    checkpoints, a folder of folders): replacing deletes what was there."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"out_dir: {path} is a file, expected a folder to write")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"out_dir: {path} exists and is not empty (pass overwrite=True, "
                              f"or --force, to replace it)")
    foreign = sorted(entry.name for entry in path.iterdir()
                     if not entry.is_file() or entry.suffix not in EXPORT_SUFFIXES)
    if foreign:
        raise FileExistsError(f"out_dir: {path} holds more than an exported model "
                              f"({', '.join(foreign[:5])}); expected an empty folder or an "
                              f"earlier export to replace")


def write_folder_atomic(path: str | os.PathLike, fill: Callable[[Path], object], *,
                        overwrite: bool = False) -> Path:
    """Call ``fill(folder)`` on a new temporary folder beside ``path``, then rename it onto
    ``path``.

    A reader (or a crash) sees the old folder or the whole new one, never a half-written
    one. An existing non-empty ``path`` raises ``FileExistsError`` unless ``overwrite``;
    then the old folder is moved aside, the new one renamed in, and the old one deleted.
    The folder gets the usual permissions (``0o777`` less the umask).
    """
    path = Path(path)
    check_writable(path, overwrite)  # before any work, and again before the rename
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        fill(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o777 & ~umask)
        check_writable(path, overwrite)
        _replace_folder(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return path


def _replace_folder(new: Path, path: Path) -> None:
    """Rename ``new`` onto ``path``; an existing ``path`` is moved aside first, then deleted
    (a rename replaces only an empty folder)."""
    if path.is_dir() and any(path.iterdir()):
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
        os.replace(path, old / path.name)
        try:
            os.replace(new, path)
        except BaseException:
            os.replace(old / path.name, path)  # put the old folder back
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(new, path)  # onto nothing, or onto an empty folder
