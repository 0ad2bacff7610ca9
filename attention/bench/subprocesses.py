"""A child process with a time limit that takes its whole family with it when it ends.

The child leads a session of its own (``start_new_session=True``), so everything it starts
(torch.compile's workers, torchrun's ranks, pytest's children) is in its process group. At
the timeout the group is killed (``os.killpg``, SIGKILL), and after the child ends what is
left of the group is killed too: nothing outlives the call. Its output goes to a log file
or is captured.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["Finished", "kill_group", "run_process"]


@dataclass(frozen=True)
class Finished:
    """How a child ended: ``returncode`` (``None``: killed at the timeout; negative: the
    signal that ended it), wall ``seconds``, and its output when captured (else ``""``)."""

    command: list[str]
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def kill_group(pgid: int) -> None:
    """SIGKILL the process group ``pgid``; nothing if it is gone already."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def run_process(command: Sequence[str | os.PathLike], *, timeout: float | None = None,
                cwd: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                log: str | os.PathLike | None = None) -> Finished:
    """Run ``command`` in a new session; kill its process group at ``timeout`` seconds
    (``None``: no limit) and once it has ended. ``log``: a file that gets its stdout and
    stderr together; without one both are captured (text, undecodable bytes replaced)."""
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout: expected seconds > 0 or None, got {timeout}")
    command = [str(part) for part in command]
    start = time.monotonic()
    # Files, not pipes: a worker left running would hold a pipe open, and reading it to its
    # end would wait for the worker.
    with contextlib.ExitStack() as stack:
        if log is not None:
            stdout = stack.enter_context(Path(log).open("wb"))
            stderr = None
        else:
            stdout, stderr = (stack.enter_context(tempfile.TemporaryFile()) for _ in range(2))
        child = subprocess.Popen(command, cwd=cwd, env=None if env is None else dict(env),
                                 stdout=stdout, stderr=stderr or subprocess.STDOUT,
                                 start_new_session=True)
        try:
            code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:  # at the timeout, after the end, and on Ctrl-C: no group left behind
            kill_group(child.pid)
            child.wait()
        seconds = time.monotonic() - start
        if log is not None:
            return Finished(command, code, seconds)
        return Finished(command, code, seconds, _read(stdout), _read(stderr))


def _read(file: IO[bytes]) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")
