"""``make demo``: the study's point in under three minutes on a 2-core CPU.

Trains VGG08, plain VGG38 and VGG38 BN+RC (Table 1's settings: Adam 1e-3, cosine) for 150
steps on Fashion-MNIST, then prints parameters, validation accuracy and the input/output
gradient ratio, and draws the three gradient flows in one picture under ``runs/demo/``.

Fashion-MNIST is looked for under ``--data-root`` and in Debian's ``dataset-fashion-mnist``,
then downloaded with its published checksums; when that fails the demo stops with one message
listing the ways to provide it (``make demo`` also tries Debian's package as root, offline).
Synthetic data only with ``--synthetic``.

Every run uses one device (the first GPU if there is one; ``study.short_run``'s default): left
to Lightning's ``auto``, a multi-GPU machine would start DDP over all its GPUs and launch the
demo again in every rank.

The table's verdicts are the study's claims (:mod:`gradtrace.studies.claims`): VGG08 and
VGG38 BN+RC learn, plain VGG38 stays at chance with a collapsed gradient. One line counts
those that hold; ``runs/demo/summary.md`` lists each with its evidence. Exit status 1, with
one line naming them, when a claim does not hold; with fewer steps than a claim needs, it is
"not established at this budget" instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gradtrace.cli.trainer_cli import idle_gpus_note
from gradtrace.console import quiet_output
from gradtrace.data import DataNotFoundError, locate_fashion_mnist
from gradtrace.studies.claims import (
    COLLAPSED_BELOW,
    LEARNS_ABOVE_CHANCE,
    check_claims,
    claims_count,
    claims_markdown,
    does_not_hold_line,
)
from gradtrace.studies.short_run import RunResult, short_run, smoke_data, table1_specs

__all__ = ["DEMO_ROWS", "PICTURE_GUIDE", "format_results", "main", "plot_overlay"]

DEMO_ROWS = ("vgg08", "vgg38", "vgg38-bn-rc")


def format_results(results: Sequence[RunResult], data: str) -> str:
    """A markdown table of the runs, with what the data and the chance level were."""
    lines = [
        "| Model | LR | Params | Steps | Train loss | Val loss | Val acc | "
        "Grad ratio in/out | Verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        chance = 1 / r.num_classes
        acc = r.metrics["val/acc"]
        verdict = "learns" if acc > LEARNS_ABOVE_CHANCE * chance else "stuck at chance"
        if r.grad_ratio < COLLAPSED_BELOW:
            verdict += ", gradients vanished"
        lines.append(
            f"| {r.spec.label} | {r.spec.lr:g} | {r.params:,} | {r.steps} | "
            f"{r.metrics.get('train/loss', float('nan')):.2f} | {r.metrics['val/loss']:.2f} | "
            f"{100 * acc:.1f}% | {r.grad_ratio:.1e} | {verdict} |"
        )
    chance = ", ".join(sorted({f"{100 / r.num_classes:g}%" for r in results}))
    return "\n".join(lines) + f"\n\nData: {data}. Chance level: {chance}.\n"


def plot_overlay(results: Sequence[RunResult], path: Path, last_n_logs: int = 5) -> Path | None:
    """All runs' gradient flow in one figure (relative depth on x; ``gradtrace compare``'s
    figure), or ``None`` without matplotlib."""
    try:
        from gradtrace.plots import plot_runs, save_figure
    except ImportError:
        return None
    if not results:
        return None
    fig = plot_runs(
        {f"{r.spec.label} (val acc {100 * r.metrics['val/acc']:.0f}%)": r.history for r in results},
        last_n_steps=last_n_logs,
        title=f"Gradient flow, mean |grad| over the last {last_n_logs} logged steps",
    )
    return save_figure(fig, path)


PICTURE_GUIDE = (
    "In the picture: one line per model, mean |gradient| per layer from the input (left) to "
    "the output (right), log scale.\n"
    "A flat line means every layer learns; plain VGG38's line falls by orders of magnitude "
    "towards the input: its gradients vanish, so its early layers never learn and it stays at "
    "chance. Batch norm + residual connections keep VGG38's line flat."
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; see ``python -m gradtrace.studies.demo --help``. Returns the exit
    status."""
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument(
        "--data-root",
        type=Path,
        default=Path("data"),
        help="where to look for Fashion-MNIST (and download it to); Debian's package is "
        "searched too (default: data)",
    )
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="train on synthetic data instead (the numbers then say nothing about real data)",
    )
    parser.add_argument(
        "--fetch-data",
        action="store_true",
        help="only find or download Fashion-MNIST, say where it is, exit 1 if it is missing",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be positive")
    if args.fetch_data:
        try:
            print(locate_fashion_mnist(args.data_root)[1])
        except DataNotFoundError:
            raise SystemExit(1) from None
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        data, description = smoke_data(
            batch_size=args.batch_size,
            val_size=args.val_size,
            root=args.data_root,
            synthetic=args.synthetic,
        )
    except DataNotFoundError as err:
        parser.exit(2, f"{parser.prog}: {err}; or run with --synthetic (not real data)\n")
    specs = table1_specs(DEMO_ROWS)
    note = idle_gpus_note(
        "the demo's runs are small and go one after the other; "
        "`make sweep-local SWEEP=sweeps/table1.yaml GPUS={ids}` runs a grid one run per GPU"
    )
    if note is not None:
        print(note)
    print(
        f"Training {', '.join(s.label for s in specs)} for {args.steps} steps each "
        f"(batch {args.batch_size}), then validating on {args.val_size} images."
    )
    with quiet_output():
        results = [short_run(spec, data, args.steps, args.out) for spec in specs]
    table = format_results(results, description)
    claims = check_claims(results)
    summary = args.out / "summary.md"
    args.out.mkdir(parents=True, exist_ok=True)
    summary.write_text("\n".join([table, "The study's claims:", *claims_markdown(claims), ""]))
    figure = plot_overlay(results, args.out / "gradient_flow.png")
    print(f"Done in {time.perf_counter() - start:.0f} s.\n\n{table}")
    print(f"The study's claims: {claims_count(claims)} (each with its evidence in {summary}).")
    print(f"Files: {summary} (this table)", end="")
    print(f", {figure} (the picture)" if figure is not None else " (no picture: no matplotlib)")
    print(f"Each run's metrics.csv, gradient_flow.csv and plots: {args.out}/<run>/")
    if figure is not None:
        print(PICTURE_GUIDE)
    failed = does_not_hold_line(claims)
    if failed is not None:
        print(f"{parser.prog}: {failed} (see {summary})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
