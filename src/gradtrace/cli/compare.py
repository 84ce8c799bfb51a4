"""Finished runs side by side: ``gradtrace compare RUN_DIR... [-o flow.png]``.

:func:`compare_runs` reads each run directory with :func:`gradtrace.cli.run_files.read_run`,
overlays the runs' gradient flow (and activation panel, when recorded) by relative depth with
:func:`gradtrace.plots.plot_runs`, each labelled with its final ``val/acc``, and summarises them
in a markdown table: run, final validation accuracy, input/output gradient ratio, and the first
dead or saturated layer in data-flow order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradtrace.checks import check_int
from gradtrace.cli.errors import CommandParser, UserError, require_matplotlib
from gradtrace.cli.run_files import (
    GRADIENT_FLOW_FILE,
    FinishedRun,
    RunFilesError,
    find_runs,
    read_run,
)
from gradtrace.gradient_flow.activation_recorder import ActivationDiagnosis
from gradtrace.measure import input_output_ratio

__all__ = ["ComparedRun", "compare_main", "compare_runs", "first_problem_layer", "markdown_table"]


@dataclass(frozen=True)
class ComparedRun:
    """One row of the comparison."""

    run: FinishedRun
    name: str
    """The run's folder name, or its path below the runs' common folder when names repeat."""
    label: str
    """The run's legend label: its name and final validation accuracy."""
    val_acc: float | None
    """The last logged ``val/acc`` (a fraction), or ``None``."""
    input_output_ratio: float
    """First over last layer's mean |grad|, each averaged over the last logged steps."""
    first_problem: str
    """The first dead or saturated layer, e.g. ``"features.3.weight (dead, 97%)"``, ``"none"``
    or ``"not recorded"`` (the run recorded no activations)."""


def first_problem_layer(
    history: Sequence[Mapping[str, Any]],
    *,
    steps: Sequence[int] | None = None,
    dead_fraction: float | None = 0.9,
    saturated_fraction: float | None = 0.9,
) -> str:
    """The first layer (data-flow order) whose mean ``act_zero_frac`` over ``steps`` exceeds
    ``dead_fraction`` or whose ``act_sat_frac`` exceeds ``saturated_fraction``.

    Returns ``"<layer> (dead, 97%)"``, ``"<layer> (saturated, 95%)"``, ``"none"``, or ``"not
    recorded"`` when the history holds no activation statistics.
    """
    ActivationDiagnosis(dead_fraction, saturated_fraction)  # the same argument checks
    wanted = set(steps) if steps is not None else None
    sums: dict[str, dict[str, list[float]]] = {}
    for record in history:
        if wanted is not None and record["step"] not in wanted:
            continue
        layer = sums.setdefault(record["layer"], {})
        for stat in ("act_zero_frac", "act_sat_frac"):
            value = record.get(stat)
            if isinstance(value, (int, float)) and math.isfinite(value):
                layer.setdefault(stat, []).append(value)
    if not any(sums.values()):
        return "not recorded"
    checks = (
        ("dead", "act_zero_frac", dead_fraction),
        ("saturated", "act_sat_frac", saturated_fraction),
    )
    for layer, values in sums.items():
        for kind, stat, threshold in checks:
            if threshold is None or stat not in values:
                continue
            mean = sum(values[stat]) / len(values[stat])
            if mean > threshold:
                return f"{layer} ({kind}, {mean:.0%})"
    return "none"


def _display_names(runs: Sequence[FinishedRun]) -> list[str]:
    """Folder names, or paths below the common folder when folder names repeat."""
    names = [run.name for run in runs]
    if len(set(names)) == len(names):
        return names
    paths = [run.path.resolve() for run in runs]
    common = Path(os.path.commonpath(paths))
    return [str(path.relative_to(common)) if path != common else path.name for path in paths]


def _last_steps(history: Sequence[Mapping[str, Any]], n: int) -> list[int]:
    return sorted({r["step"] for r in history})[-n:]


def compare_runs(
    run_dirs: Sequence[str | Path],
    *,
    output: str | Path | None = None,
    last_n_steps: int = 5,
    dead_fraction: float | None = 0.9,
    saturated_fraction: float | None = 0.9,
    title: str | None = None,
) -> list[ComparedRun]:
    """Compare finished runs; with ``output``, also save their overlaid gradient flow there.

    Each of ``run_dirs`` is a run directory or a folder of them (e.g. a sweep's output folder:
    every run directly inside it, by name).

    Every run is summarised over its last ``last_n_steps`` logged steps.

    Raises:
        RunFilesError: a directory is not a run, lacks ``gradient_flow.csv`` or holds one
            without ``mean_abs`` values (one line naming the path).
        ValueError: a bad argument.
    """
    check_int("last_n_steps", last_n_steps, 1)
    if not run_dirs:
        raise ValueError("compare_runs needs at least one run directory; got none")
    runs = [read_run(run) for path in run_dirs for run in find_runs(path)]
    rows = []
    for run, name in zip(runs, _display_names(runs)):
        flow_csv = run.path / GRADIENT_FLOW_FILE
        if not run.gradient_flow:
            raise RunFilesError(f"{flow_csv}: no gradient-flow records (missing or empty)")
        if not any(math.isfinite(r.get("mean_abs", math.nan)) for r in run.gradient_flow):
            raise RunFilesError(
                f"{flow_csv}: no mean_abs values (columns {', '.join(run.gradient_flow[0])})"
            )
        steps = _last_steps(run.gradient_flow, last_n_steps)
        recent = [r for r in run.gradient_flow if r["step"] in set(steps)]
        val_acc = run.last("val/acc")
        try:
            ratio = input_output_ratio(recent, last_n=last_n_steps)
        except ValueError:  # a single layer
            ratio = math.nan
        problem = first_problem_layer(
            recent, dead_fraction=dead_fraction, saturated_fraction=saturated_fraction
        )
        label = f"{name} (val acc {val_acc:.1%})" if val_acc is not None else name
        rows.append(ComparedRun(run, name, label, val_acc, ratio, problem))
    if output is not None:
        from gradtrace.plots import plot_runs, save_figure

        fig = plot_runs(
            {row.label: row.run.gradient_flow for row in rows},
            last_n_steps=last_n_steps,
            title=title or f"Gradient flow over the last {last_n_steps} logged steps of each run",
        )
        save_figure(fig, output)
    return rows


def markdown_table(rows: Sequence[ComparedRun]) -> str:
    """The comparison as a markdown table."""
    lines = [
        "| run | val acc | input/output ratio | first dead/saturated layer |",
        "|---|---:|---:|---|",
    ]
    for row in rows:
        acc = f"{row.val_acc:.1%}" if row.val_acc is not None else "-"
        ratio = f"{row.input_output_ratio:.2e}" if math.isfinite(row.input_output_ratio) else "-"
        lines.append(f"| {row.name} | {acc} | {ratio} | {row.first_problem} |")
    return "\n".join(lines)


def compare_main(argv: Sequence[str]) -> int:
    """``gradtrace compare``: print the table and write the overlaid figure."""
    parser = CommandParser(
        prog="gradtrace compare",
        description="Overlay the gradient flow (and activations, when recorded) of finished "
        "runs by relative depth in one figure, and print a markdown table of the run, its "
        "final validation accuracy, its input/output gradient ratio and its first dead or "
        "saturated layer.",
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        type=Path,
        help="a run directory, or a folder of them (a sweep's or the demo's output)",
    )
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("flow.png"), help="the figure (default: flow.png)"
    )
    parser.add_argument(
        "--last-n-steps", type=int, default=5, help="logged steps averaged per run (default: 5)"
    )
    parser.add_argument(
        "--dead-fraction",
        type=float,
        default=0.9,
        help="a layer is dead when more than this fraction of its outputs is zero (default: 0.9)",
    )
    parser.add_argument(
        "--saturated-fraction",
        type=float,
        default=0.9,
        help="a layer is saturated when more than this fraction of its outputs sits in the flat "
        "part of its activation (default: 0.9)",
    )
    parser.add_argument("--title", default=None, help="the figure's title (default: none)")
    args = parser.parse_args(list(argv))
    require_matplotlib("compare")
    try:
        rows = compare_runs(
            args.run_dirs,
            output=args.output,
            last_n_steps=args.last_n_steps,
            dead_fraction=args.dead_fraction,
            saturated_fraction=args.saturated_fraction,
            title=args.title,
        )
    except ValueError as err:  # RunFilesError included
        raise UserError(str(err)) from None
    print(markdown_table(rows))
    print(f"\nFigure: {args.output}")
    return 0
