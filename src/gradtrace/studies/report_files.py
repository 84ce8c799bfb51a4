"""Where a study's report goes, shared by the Table 1 reproduction and the architecture
comparison: ``<out>/report.md`` beside the figures already drawn under ``<out>/figures/``,
copied to the committed ``reports/`` only when asked, and the end of the command (the report,
where it went, and the exit status its claims give)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from gradtrace.studies.claims import Claim, does_not_hold_line

__all__ = ["REPORT_FILE", "finish_study", "save_report"]

REPORT_FILE = "report.md"


def save_report(
    report: str,
    figure_paths: Sequence[Path],
    out: Path,
    committed: Path,
    update_reports: bool = False,
) -> None:
    """Write ``report`` to ``<out>/report.md``; with ``update_reports`` also copy it to
    ``committed`` and the figures to the ``figures/`` folder beside it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).write_text(report)
    if update_reports:
        committed_figures = committed.parent / "figures"
        committed_figures.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / REPORT_FILE, committed)
        for path in figure_paths:
            if path.resolve() != (committed_figures / path.name).resolve():
                shutil.copyfile(path, committed_figures / path.name)


def finish_study(
    prog: str,
    report: str,
    claims: Sequence[Claim],
    out: Path,
    committed: Path,
    update_reports: bool,
) -> int:
    """Print the saved report and where it went; 1 (after one line naming them on stderr)
    when a claim does not hold, else 0."""
    print(report)
    copied = f"; copied to {committed} and its folder" if update_reports else ""
    print(f"Wrote {out / REPORT_FILE} and its figures in {out / 'figures'}{copied}.")
    failed = does_not_hold_line(claims)
    if failed is not None:
        print(f"{prog}: {failed} (see {out / REPORT_FILE})", file=sys.stderr)
        return 1
    return 0
