"""``make reproduce-architectures``: the architecture comparison of the seed paper and the
lecture notes, reproduced, with the sources' claims checked.

Two budgets:

``full`` (default; for GPUs)
    The grid of ``sweeps/architectures.yaml`` (the VGG38 variants, CIFAR ResNet-20/56/110 and
    their plain twins, GoogLeNet with and without auxiliary heads and BN, ViT-Ti, Swin-T and
    the seed paper's VGG, on CIFAR-10 and CIFAR-100, 100 epochs each), launched as ``sweep local``
    launches it (one run per GPU at a time with ``--gpus``; one line per run as it ends; a
    finished run is skipped and an interrupted one resumed on the next call) under ``--root``
    (default ``runs/architectures``). ``--from DIR`` reads finished runs of that grid instead
    (``runs/sweeps/architectures`` after ``make sweep SWEEP=sweeps/architectures.yaml``).
``smoke`` (CPU, under 10 minutes)
    Every model of the grid but the 110-layer twins and the GoogLeNets without BN (probed at
    initialisation only), trained in process the same number of steps (default 150, batch 8:
    a GoogLeNet alone costs 1.3 s a step at batch 16 on 2 CPU cores) on real Fashion-MNIST,
    under ``--root`` (default ``runs/architectures-smoke``).

Each model is probed (:mod:`gradtrace.measure.probe`) at initialisation over several seeds
and after training, on one batch of the data; the batch-norm depth series and the GoogLeNets'
auxiliary control are probed at initialisation. Writes ``<out>/report.md`` and
``<out>/figures/architectures_*.png``; ``--update-reports`` also copies them to the committed
``reports/architectures.md`` and ``reports/figures/``.

Exit status: 0 when every claim holds or is not established at the budget; 1 when a run
failed or a claim does not hold (one line names those); 2 for bad input; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gradtrace.cli.trainer_cli import idle_gpus_note
from gradtrace.data import DataNotFoundError
from gradtrace.studies.architectures.claims import check_study
from gradtrace.studies.architectures.figures import study_figures
from gradtrace.studies.architectures.report import format_study_report
from gradtrace.studies.architectures.results import Study, collect_study, smoke_study
from gradtrace.studies.architectures.specs import SWEEP_FILE, model_specs
from gradtrace.studies.report_files import REPORT_FILE, finish_study, save_report
from gradtrace.sweeps.grid import SweepConfigError
from gradtrace.sweeps.launch import Interrupted, parse_gpus, split_run_arguments
from gradtrace.sweeps.outcome import FAILED

__all__ = ["main", "write_study_report"]

log = logging.getLogger(__name__)

FULL_ROOT = Path("runs/architectures")
SMOKE_ROOT = Path("runs/architectures-smoke")
COMMITTED_REPORT = Path("reports/architectures.md")


def write_study_report(
    study: Study, out: Path, wall_seconds: float, update_reports: bool = False
) -> tuple[str, list]:
    """Write ``<out>/report.md`` and its figures (and, with ``update_reports``, the committed
    copies); returns the report and its claims."""
    claims = check_study(study)
    paths = study_figures(study, out / "figures")
    report = format_study_report(study, claims, paths, out, wall_seconds=wall_seconds)
    save_report(report, paths, out, COMMITTED_REPORT, update_reports)
    return report, [claim for _, group in claims for claim in group]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make reproduce-architectures",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Arguments after `--` go to every full-budget run's `gradtrace fit`, e.g. "
        "`-- --data.root=/datasets/cifar`.",
    )
    parser.add_argument("--budget", choices=("full", "smoke"), default="full")
    parser.add_argument("--sweep", type=Path, default=SWEEP_FILE, help="the grid's sweep file")
    parser.add_argument("--from", dest="source", type=Path, help="collect finished runs from DIR")
    parser.add_argument(
        "--root",
        type=Path,
        help=f"where the runs go (default: {FULL_ROOT}; smoke budget: {SMOKE_ROOT})",
    )
    parser.add_argument(
        "--out", type=Path, help=f"where {REPORT_FILE} and figures/ go (default: the --root folder)"
    )
    parser.add_argument(
        "--update-reports",
        action="store_true",
        help=f"also copy the report and its figures to the committed {COMMITTED_REPORT} and "
        f"{COMMITTED_REPORT.parent / 'figures'}/",
    )
    parser.add_argument("--gpus", help="full budget: e.g. 0,1,2,3")
    parser.add_argument(
        "--seeds", type=int, default=3, help="seeds of the probes at initialisation"
    )
    parser.add_argument("--probe-batch", type=int, default=32, help="images of the probes' batch")
    smoke_group = parser.add_argument_group("smoke budget")
    smoke_group.add_argument("--steps", type=int, default=150, help="optimizer steps per model")
    smoke_group.add_argument("--batch-size", type=int, default=8)
    smoke_group.add_argument("--val-size", type=int, default=500)
    smoke_group.add_argument(
        "--synthetic",
        action="store_true",
        help="synthetic data instead of Fashion-MNIST (the numbers then say nothing)",
    )
    return parser


def _run_full_budget(sweep: Path, root: Path, extra: Sequence[str], gpus: Sequence[str]) -> bool:
    from gradtrace.sweeps.commands import run_local

    results = run_local(sweep, gpus=gpus, root=root, overrides=extra, use_wandb=False)
    return not any(result.status == FAILED for result in results)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; see ``python -m gradtrace.studies.architectures --help``."""
    argv, extra = split_run_arguments(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if min(args.seeds, args.probe_batch, args.steps, args.batch_size, args.val_size) < 1:
        parser.error("--seeds, --probe-batch, --steps, --batch-size and --val-size must be >= 1")
    if args.source is not None and args.budget == "smoke":
        parser.error("--from collects full-budget runs; leave out --budget smoke")
    if extra and (args.budget == "smoke" or args.source is not None):
        parser.error("arguments after `--` go to full-budget runs only")
    try:
        specs, datasets = model_specs(args.sweep)
        gpus = parse_gpus(args.gpus)
    except (SweepConfigError, ValueError) as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = args.root or (SMOKE_ROOT if args.budget == "smoke" else FULL_ROOT)
    seeds = range(args.seeds)
    start = time.perf_counter()
    try:
        if args.budget == "smoke":
            study = smoke_study(
                specs,
                root,
                args.steps,
                args.batch_size,
                args.probe_batch,
                seeds,
                val_size=args.val_size,
                synthetic=args.synthetic,
            )
        else:
            if args.source is None:
                if not gpus and (note := idle_gpus_note("--gpus {ids} runs one model per GPU")):
                    log.info("%s", note)
                if not _run_full_budget(args.sweep, root, extra, gpus):
                    return 1
            study = collect_study(args.source or root, specs, datasets, args.probe_batch, seeds)
    except (Interrupted, KeyboardInterrupt) as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 130
    except (ValueError, DataNotFoundError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    out = args.out or root
    report, claims = write_study_report(
        study, out, time.perf_counter() - start, args.update_reports
    )
    return finish_study(parser.prog, report, claims, out, COMMITTED_REPORT, args.update_reports)
