"""Where a benchmark runs: the machine (device name, the CPUs this process may use, and so
the default number of CPU threads), the software, the git commit of the package's source
when that source is a git checkout, and the command line. Nothing here assumes a repository
layout: paths are shown relative to the folder that holds the imported package."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["available_cpus", "command_line", "default_threads", "device_name", "environment",
           "git_commit", "package_dir", "package_version", "shown_path"]


def package_dir() -> Path:
    """The folder of the ``attention`` package this process imported: in a clone, or in
    site-packages when installed."""
    import attention

    return Path(attention.__file__).resolve().parent


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity where the system has one (Linux),
    else every CPU of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads(device: str) -> int | None:
    """torch's CPU threads for a run on ``device``: :func:`available_cpus` on ``cpu``;
    ``None`` (torch's own choice) on ``cuda``."""
    return available_cpus() if device == "cpu" else None


def _git(source: Path, *args: str) -> str | None:
    """``git args`` run in ``source``: its output, or ``None`` if git fails or is missing."""
    try:
        done = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit(source: str | os.PathLike | None = None) -> tuple[str | None, bool | None]:
    """The short commit of the git checkout that tracks the package's source, and whether
    its tracked files have uncommitted changes; ``(None, None)`` when the source is not in
    a checkout (an installed wheel), git is missing, or it fails.

    ``source``: the folder to ask (default: :func:`package_dir`); its ``__init__.py`` must
    be tracked, so that a site-packages folder inside some other checkout does not count.
    """
    source = package_dir() if source is None else Path(source)
    if _git(source, "ls-files", "--error-unmatch", "--", "__init__.py") is None:
        return None, None
    commit = _git(source, "rev-parse", "--short", "HEAD")
    if commit is None:
        return None, None
    status = _git(source, "status", "--porcelain", "--untracked-files=no")
    return commit, None if status is None else bool(status)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the machine's CPU count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.partition(':')[2].strip()}, {os.cpu_count()} CPUs"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def package_version(name: str) -> str | None:
    """The installed version of the distribution ``name``, or ``None`` if it is not."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as results show it, without this machine's folders: relative to the folder
    holding the package when inside it, else its last two parts when absolute, else as
    given."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    resolved = path.resolve()
    if resolved.is_relative_to(package_dir().parent):
        return str(resolved.relative_to(package_dir().parent))
    return str(Path(*resolved.parts[-2:]))


def command_line(script: str | os.PathLike, argv: Sequence[str] | None = None) -> str:
    """``python SCRIPT ARGS`` as run: ``argv`` (default ``sys.argv[1:]``), absolute paths
    in it (and in ``--flag=PATH``) shown by :func:`shown_path`."""
    def shown(argument: str) -> str:
        flag, equals, value = argument.partition("=")
        if equals and flag.startswith("-"):
            return f"{flag}={shown_path(value)}" if value.startswith("/") else argument
        return shown_path(argument) if argument.startswith("/") else argument

    arguments = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", shown_path(Path(script).resolve()),
                       *map(shown, map(str, arguments))])


def environment(device: torch.device | str, command: str,
                packages: Sequence[str] = ()) -> dict[str, Any]:
    """What the results record about the run: date, device, threads, versions, platform,
    git commit (and dirty flag) and the command line; ``packages``: distributions whose
    versions are recorded too, under ``packages`` (``None``: not installed)."""
    device = torch.device(device)
    commit, dirty = git_commit()
    record = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device.type, "device_name": device_name(device),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "x_transformers": package_version("x-transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(), "git_commit": commit, "git_dirty": dirty,
        "command": command,
    }
    if packages:
        record["packages"] = {name: package_version(name) for name in packages}
    return record
