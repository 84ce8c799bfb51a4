"""``make demo``: the study's point in about four minutes on a 2-core CPU, offline.

Trains VGG08, plain VGG38 and VGG38 BN+RC (Table 1's settings: Adam 1e-3, cosine) for 150
steps on Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (synthetic data, with a
loud notice, when it is missing), then prints parameters, validation accuracy and the
input/output gradient ratio, and writes gradient-flow plots under ``runs/demo/``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from gradtrace.experiments.study import RunResult, short_run, smoke_data, table1_specs

__all__ = ["DEMO_ROWS", "format_results", "main", "plot_overlay"]

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
        verdict = "learns" if acc > 2 * chance else "stuck at chance"
        if r.grad_ratio < 1e-3:
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


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
    """Run the demo; see ``python -m gradtrace.experiments.demo --help``."""
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be positive")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    data, description = smoke_data(batch_size=args.batch_size, val_size=args.val_size)
    results = [
        short_run(spec, data, args.steps, args.out, enable_progress_bar=False)
        for spec in table1_specs(DEMO_ROWS)
    ]
    table = format_results(results, description)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(table)
    figure = plot_overlay(results, args.out / "gradient_flow.png")
    print("\n" + table)
    for r in results:
        print(f"{r.spec.label}: logs, gradient_flow.csv and plots in {r.log_dir}")
    if figure is not None:
        print(f"Overlay of the three gradient flows: {figure}")
    print(f"Done in {time.perf_counter() - start:.0f} s.")
    return results


if __name__ == "__main__":
    main()
