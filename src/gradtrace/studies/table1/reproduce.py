"""``make reproduce-table1``: Table 1 and Figures 1-5 of the MLP Coursework 2 report.

Two budgets:

``full`` (default; for GPUs)
    The seven shipped ``configs/table1/*`` runs (CIFAR-100, 47,500 / 2,500 / 10,000, Adam,
    cosine annealing to 2e-5, batch 100, 100 epochs, crop + flip, the original's fixed
    CIFAR-10 normalisation, fp32), each through the ``gradtrace`` CLI as a subprocess under
    ``--root`` (default ``runs/table1``), on one device (one row per GPU at a time with
    ``--gpus``, else one after the other; a finished row is skipped and an interrupted one
    resumed on the next call, as in ``sweep local``). Each run's output goes to its
    ``launch.log``; the command prints one line per run as it ends and a summary, and stops
    with exit status 1 when a run failed. ``--from DIR`` collects the rows from finished
    runs instead: any folder holding CLI runs (``runs/sweeps/table1`` after ``make
    sweep-local SWEEP=sweeps/table1.yaml``, or a W&B agent's output folder).
``smoke`` (CPU, minutes)
    Fashion-MNIST (found or downloaded; synthetic data only with ``--synthetic``), a
    class-balanced subset, 150 steps per row (300 for VGG38 RC, which starts slowly without
    BN), batch 16, in process (``study.short_run``) on one device, under ``--root`` (default
    ``runs/table1-smoke``). The numbers are not CIFAR-100's; what must hold is the report's
    qualitative result: plain VGG38 at chance with a collapsed gradient ratio, the BN, RC and
    BN+RC rows learn.

Writes ``<out>/report.md`` (:mod:`~gradtrace.studies.table1.report`) and
``<out>/figures/fig{1..5}_*.png`` (:mod:`~gradtrace.studies.table1.figures`), ``--out``
being the runs' folder unless given; ``--update-reports`` also copies them to the committed
``reports/table1.md`` and ``reports/figures/``. Rows are read by
:mod:`~gradtrace.studies.table1.rows`.

Exit status: 0 when every claim of the report holds or is not established at the budget
(:mod:`gradtrace.studies.claims`); 1 when a run failed, or when a claim does not hold (after
writing the report; one line names those claims); 2 for bad input (arguments, missing data or
runs); 130 when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gradtrace.cli.run_files import read_run
from gradtrace.cli.trainer_cli import idle_gpus_note
from gradtrace.data import DataNotFoundError
from gradtrace.studies.claims import (
    SETTLING_STEPS,
    SLOW_START,
    Claim,
    check_claims,
)
from gradtrace.studies.report_files import REPORT_FILE, finish_study, save_report
from gradtrace.studies.short_run import table1_specs
from gradtrace.studies.table1.figures import figures
from gradtrace.studies.table1.report import format_report
from gradtrace.studies.table1.rows import METRICS, RowRun, collect, measured
from gradtrace.sweeps.launch import (
    LOG_FILE,
    RESUME_ARGUMENT,
    Interrupted,
    parse_gpus,
    run_cells,
    split_run_arguments,
)
from gradtrace.sweeps.outcome import FAILED, summary_line

__all__ = ["full_commands", "main", "run_full_budget", "smoke", "write_report"]

log = logging.getLogger(__name__)

FULL_ROOT = Path("runs/table1")
SMOKE_ROOT = Path("runs/table1-smoke")
# The committed copy, refreshed only with --update-reports.
COMMITTED_REPORT = Path("reports/table1.md")


def full_commands(root: Path, extra: Sequence[str] = ()) -> list[tuple[Path, list[str]]]:
    """``(run directory, command)`` of the seven full-budget runs: the shipped configs
    through the CLI under ``root`` (each in the directory the CLI names it), resuming from
    ``last.ckpt`` when one exists."""
    from gradtrace.cli.trainer_cli import last_checkpoint, run_directory

    runs = []
    for spec in table1_specs():
        args = ["fit", f"--config=table1/{spec.name}", f"--trainer.default_root_dir={root}"]
        args += list(extra)
        run_dir = run_directory(args)
        resume = [RESUME_ARGUMENT] if last_checkpoint(run_dir) is not None else []
        runs.append((run_dir, [sys.executable, "-m", "gradtrace", *args, *resume]))
    return runs


def run_full_budget(root: Path, extra: Sequence[str], gpus: Sequence[str]) -> bool:
    """Run the seven full-budget rows under ``root`` (:func:`full_commands`), one line per
    run as it ends and a summary; whether all of them finished."""
    runs = full_commands(root, extra)
    where = f"one per GPU at a time on GPUs {' '.join(gpus)}" if gpus else "one after the other"
    logs = f"{root}/<run>/{LOG_FILE}"
    print(f"Table 1: {len(runs)} runs, {where}, under {root} (each run's output: {logs})")
    results = run_cells(runs, gpus=gpus)
    print(summary_line("Table 1", results, logs))
    return not any(result.status == FAILED for result in results)


def smoke(
    root: Path,
    steps: int = SETTLING_STEPS,
    batch_size: int = 16,
    subset: int | None = None,
    val_size: int = 300,
    every_n_steps: int = 5,
    val_checks_per_epoch: int = 2,
    synthetic: bool = False,
) -> tuple[list[RowRun], str]:
    """Train the seven rows briefly on the smoke data; returns the rows and the data's
    description.

    Each row trains ``steps`` optimizer steps (times its
    :data:`~gradtrace.studies.claims.SLOW_START` factor) on a
    class-balanced ``subset`` of the training images (default: two epochs of ``steps``),
    so the training metrics are those of the last epoch, as in the report; validation
    runs ``val_checks_per_epoch`` times an epoch. ``synthetic`` trains on synthetic data
    instead of Fashion-MNIST (never a silent fallback).
    """
    from gradtrace.studies.short_run import short_run, smoke_data

    subset = subset or steps * batch_size // 2
    data, description = smoke_data(
        batch_size=batch_size, val_size=val_size, subset=subset, synthetic=synthetic
    )
    description += (
        f"; {subset:,} training images (class-balanced subset, {subset // batch_size} steps "
        f"an epoch), {val_size:,} validation images"
    )
    rows = []
    for spec in table1_specs():
        start = time.perf_counter()
        row_steps = steps * SLOW_START.get(spec.name, 1)
        log.info("smoke: %s, lr %g, %d steps", spec.label, spec.lr, row_steps)
        result = short_run(
            spec,
            data,
            max_steps=row_steps,
            root=root,
            every_n_steps=every_n_steps,
            enable_progress_bar=False,
            val_check_interval=1.0 / val_checks_per_epoch,
        )
        seconds = time.perf_counter() - start
        run = read_run(result.log_dir)
        final, curves, _, epochs = measured(run)
        final.update({k: v for k, v in result.metrics.items() if k in METRICS})
        rows.append(
            RowRun(
                spec=spec,
                metrics=final,
                steps=result.steps,
                epochs=epochs,
                curves=curves,
                history=run.gradient_flow,
                source=result.log_dir,
                num_classes=result.num_classes,
                in_chans=data.num_channels,
                seconds=seconds,
            )
        )
        log.info(
            "smoke: %s, lr %g: val acc %.1f%% in %.0f s",
            spec.label,
            spec.lr,
            100 * final.get("val/acc", math.nan),
            seconds,
        )
    return rows, description


def write_report(
    rows: Sequence[RowRun],
    claims: Sequence[Claim],
    budget: str,
    data: str,
    out: Path,
    wall_seconds: float,
    update_reports: bool = False,
) -> str:
    """Write ``<out>/report.md`` and ``<out>/figures/`` (with ``update_reports``, copy them to
    the committed ``reports/table1.md`` and ``reports/figures/`` too); returns the report."""
    paths = figures(rows, out, budget)
    report = format_report(rows, claims, budget, data, paths, out, wall_seconds=wall_seconds)
    save_report(report, paths, out, COMMITTED_REPORT, update_reports)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; see ``python -m gradtrace.studies.table1 --help``."""
    argv, extra = split_run_arguments(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="make reproduce-table1",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Arguments after `--` go to every full-budget run's `gradtrace fit`, e.g. "
        "`-- --data.root=/datasets/cifar`.",
    )
    parser.add_argument("--budget", choices=("full", "smoke"), default="full")
    parser.add_argument(
        "--from", dest="source", type=Path, default=None, help="collect finished runs from DIR"
    )
    parser.add_argument("--dataset", default="cifar100", help="dataset of the runs --from collects")
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help=f"where the runs go (default: {FULL_ROOT}; smoke budget: {SMOKE_ROOT})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"where {REPORT_FILE} and figures/ go (default: the --root folder)",
    )
    parser.add_argument(
        "--update-reports",
        action="store_true",
        help=f"also copy the report and its figures to the committed {COMMITTED_REPORT} and "
        f"{COMMITTED_REPORT.parent / 'figures'}/",
    )
    parser.add_argument("--gpus", default=None, help="full budget: e.g. 0,1,2,3")
    smoke_group = parser.add_argument_group("smoke budget")
    smoke_group.add_argument(
        "--steps",
        type=int,
        default=SETTLING_STEPS,
        help=f"optimizer steps per row (VGG38 RC: x{SLOW_START['vgg38-rc']})",
    )
    smoke_group.add_argument("--batch-size", type=int, default=16)
    smoke_group.add_argument(
        "--subset", type=int, default=None, help="training images (default: 2 epochs of steps)"
    )
    smoke_group.add_argument("--val-size", type=int, default=300)
    smoke_group.add_argument("--every", type=int, default=5, help="log every N steps")
    smoke_group.add_argument("--val-checks", type=int, default=2, help="validations per epoch")
    smoke_group.add_argument(
        "--synthetic",
        action="store_true",
        help="synthetic data instead of Fashion-MNIST (the numbers then say nothing)",
    )
    args = parser.parse_args(argv)
    sizes = (args.steps, args.batch_size, args.subset or 1, args.val_size, args.every)
    if min(*sizes, args.val_checks) < 1:
        parser.error(
            "--steps, --batch-size, --subset, --val-size, --every and --val-checks must be >= 1"
        )
    if args.subset is not None and args.subset < args.batch_size:
        parser.error(f"--subset ({args.subset}) must hold at least one batch ({args.batch_size})")
    if args.source is not None and args.budget == "smoke":
        parser.error("--from collects full-budget runs; leave out --budget smoke")
    if extra and (args.budget == "smoke" or args.source is not None):
        parser.error("arguments after `--` go to full-budget runs only")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        gpus = parse_gpus(args.gpus)
        if args.source is None and not gpus:
            how = (
                "the smoke budget runs in process; the full budget's --gpus {ids} "
                "(make reproduce-table1 GPUS={ids}) runs one row per GPU"
                if args.budget == "smoke"
                else "--gpus {ids} (make reproduce-table1 GPUS={ids}) runs one row per GPU"
            )
            if (note := idle_gpus_note(how)) is not None:
                log.info("%s", note)
        root = args.root or (SMOKE_ROOT if args.budget == "smoke" else FULL_ROOT)
        if args.budget == "smoke":
            rows, data = smoke(
                root,
                steps=args.steps,
                batch_size=args.batch_size,
                subset=args.subset,
                val_size=args.val_size,
                every_n_steps=args.every,
                val_checks_per_epoch=args.val_checks,
                synthetic=args.synthetic,
            )
        else:
            if args.source is None and not run_full_budget(root, extra, gpus):
                return 1
            rows = collect(args.source or root, dataset=args.dataset)
            data = f"{args.dataset} (runs under {args.source or root})"
            if args.dataset == "cifar100":
                data = (
                    "CIFAR-100, 47,500 / 2,500 / 10,000 split, batch 100, crop + flip "
                    f"(runs under {args.source or root})"
                )
    except (Interrupted, KeyboardInterrupt) as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, DataNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - start
    out = args.out or root
    claims = check_claims(rows)
    report = write_report(rows, claims, args.budget, data, out, wall, args.update_reports)
    return finish_study(parser.prog, report, claims, out, COMMITTED_REPORT, args.update_reports)
