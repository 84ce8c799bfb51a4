"""How launched processes ended, one line each: a run of ``sweep local`` or Table 1, or a W&B
agent.

A launcher prints nothing of a child's own output (progress bars, Lightning's banners, its
warnings): that goes to the child's log file. What it prints per child is one
:meth:`LaunchResult.line` when the child ends (its name, its status and, on failure, the last
line of its log that reads as an error: :func:`last_error_line`), then one
:func:`summary_line`.
"""

from __future__ import annotations

import re
import signal
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DONE",
    "FAILED",
    "SKIPPED",
    "LaunchResult",
    "last_error_line",
    "log_mentions",
    "summary_line",
]

DONE = "done"
FAILED = "failed"
SKIPPED = "skipped"
# A failed run's error sits in the last lines of its log; reading the tail bounds the work on
# logs of long runs.
TAIL_BYTES = 64 * 1024
# wandb colours its lines even in a log file (``\x1b[1;34mwandb\x1b[0m: ...``).
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# What an error line looks like: an argparse-style ``gradtrace: error: ...`` (or ``wandb:
# ERROR ...``), or the exception line that ends a Python traceback (``RuntimeError: ...``,
# ``torch.OutOfMemoryError: ...``, a bare ``KeyboardInterrupt``), possibly behind the
# ``[rank1]:`` prefix torch.distributed puts on each rank's lines.
ERROR_LINE = re.compile(
    r"^(?:\[rank\d+\]:\s*)?"
    r"(?:(?:\S+: )?(?:error|ERROR)\b"
    r"|(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit)(?::|$))"
)


def _tail_lines(log_file: Path, start: int = 0) -> list[str]:
    """The lines of ``log_file`` from byte ``start`` on (at most its last :data:`TAIL_BYTES`),
    without terminal colours, progress-bar redraws (``\\r``) split into lines of their own;
    ``[]`` without the file."""
    try:
        with log_file.open("rb") as log:
            size = log.seek(0, 2)
            log.seek(max(start, size - TAIL_BYTES))
            text = log.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    return re.split(r"[\r\n]+", ANSI_ESCAPE.sub("", text))


def log_mentions(log_file: Path, text: str, start: int = 0) -> bool:
    """Whether a line of ``log_file`` from byte ``start`` on holds ``text`` (colours ignored);
    read line by line, so a long log is never held whole."""
    try:
        with log_file.open("rb") as log:
            log.seek(start)
            return any(text in ANSI_ESCAPE.sub("", line.decode(errors="replace")) for line in log)
    except FileNotFoundError:
        return False


def last_error_line(log_file: Path, start: int = 0) -> str | None:
    """The last line of ``log_file`` (from byte ``start`` on) that reads as an error (see
    :data:`ERROR_LINE`), or ``None`` when none does."""
    for line in reversed(_tail_lines(log_file, start)):
        if ERROR_LINE.match(line.rstrip()):
            return line.strip()
    return None


def _exit_description(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


@dataclass
class LaunchResult:
    """How one launched process ended: ``status`` is :data:`DONE`, :data:`SKIPPED` (finished
    by an earlier launch) or :data:`FAILED`; ``error_line`` is a failed one's
    :func:`last_error_line`; ``resumed`` says it continued from a checkpoint."""

    name: str
    status: str
    log_file: Path
    exit_code: int | None = None
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    resumed: bool = False
    error_line: str | None = None

    def line(self, index: int, total: int) -> str:
        """``[index+1/total] NAME: STATUS...``: what the launcher prints when it ends."""
        head = f"[{index + 1}/{total}] {self.name}: " + ("resumed, " if self.resumed else "")
        if self.status == SKIPPED:
            return f"{head}skipped: finished earlier"
        if self.status == DONE:
            shown = f", val/acc {self.metrics['val/acc']:.4f}" if "val/acc" in self.metrics else ""
            return f"{head}done in {self.seconds:.0f} s{shown}"
        how = _exit_description(self.exit_code)
        cause = self.error_line or f"no error line in {self.log_file}"
        return f"{head}failed ({how}) after {self.seconds:.0f} s: {cause}"


def summary_line(subject: str, results: Sequence[LaunchResult], logs: str) -> str:
    """``SUBJECT: N done, M failed[, K skipped (finished earlier)]; logs: LOGS``."""
    counts = Counter(result.status for result in results)
    parts = [f"{counts[DONE]} done", f"{counts[FAILED]} failed"]
    if counts[SKIPPED]:
        parts.append(f"{counts[SKIPPED]} skipped (finished earlier)")
    return f"{subject}: {', '.join(parts)}; logs: {logs}"
