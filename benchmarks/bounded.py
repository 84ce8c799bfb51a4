"""Hard time limits: child processes killed at their limit, with every process they started,
and a deadline that hands each step of a run at most the time left.

``make gpu-check`` must end within 8 minutes whatever a step does (a compile that takes
longer than usual, a training process that hangs), so each step runs in its own process
group and is killed, not asked, at its limit.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Deadline", "Finished", "kill_group", "run_bounded"]

# After a kill, how long to wait for the pipes to close (a grandchild that left the process
# group could hold them open).
_DRAIN_S = 5.0


@dataclass(frozen=True)
class Finished:
    """How a bounded child process ended: ``returncode`` (``None`` when it was killed at its
    limit), its output and how long it ran."""

    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def kill_group(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and every process in its group (it was started with
    ``start_new_session=True``)."""
    with contextlib.suppress(ProcessLookupError):  # already gone, with its group
        os.killpg(proc.pid, signal.SIGKILL)


def run_bounded(
    command: Sequence[str],
    timeout_s: float,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Finished:
    """Run ``command`` for at most ``timeout_s`` seconds; at the limit it is killed together
    with every process it started."""
    start = time.monotonic()
    proc = subprocess.Popen(
        list(command),
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: killed as a whole
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
        returncode: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        kill_group(proc)
        returncode = None
        try:
            stdout, stderr = proc.communicate(timeout=_DRAIN_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = "", ""
    finally:
        if proc.poll() is None:
            kill_group(proc)
            proc.wait()
    return Finished(returncode, stdout or "", stderr or "", time.monotonic() - start)


class Deadline:
    """A hard end ``seconds`` after its creation (none with ``None``).

    :meth:`timeout` gives a step its own limit, or less when less time is left, or ``None``
    (do not start it) when fewer seconds are left than the step needs to be of any use.
    """

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._end = math.inf if seconds is None else clock() + seconds

    def left(self) -> float:
        """Seconds left (``inf`` without a deadline)."""
        return self._end - self._clock()

    def timeout(self, limit_s: float, least_s: float) -> float | None:
        """The timeout of a step allowed ``limit_s`` seconds that needs at least ``least_s``."""
        left = self.left()
        return None if left < least_s else min(limit_s, left)
