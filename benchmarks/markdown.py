"""``reports/bench.md``: the report's figures, step times, GPU section and caveats."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from benchmarks.figures import Goal, number

__all__ = ["render_markdown"]


def _spread(summary: Mapping[str, Any] | None, unit: str) -> tuple[str, str, str]:
    if summary is None:
        return "n/a", "n/a", "0"
    median = number(summary["median"], unit)
    if summary["rounds"] == 1:
        return median, "-", "1"
    interval = f"{number(summary['ci_low'], unit)} - {number(summary['ci_high'], unit)}"
    interval += f" ({100 * summary['ci_coverage']:.0f}%)"
    return median, interval, str(summary["rounds"])


def _figure_rows(report: Mapping[str, Any]) -> list[str]:
    lines = [
        "| Figure | Median | Interval of the median (confidence) | Rounds | Goal | Verdict |",
        "|---|---|---|---|---|---|",
    ]
    for figure in report["figures"].values():
        unit = figure["unit"]
        median, spread, rounds = _spread(figure["summary"], unit)
        goal = "-" if figure["goal"] is None else str(Goal(**figure["goal"], unit=unit))
        verdict = "-" if figure["verdict"] is None else f"**{figure['verdict']}**"
        if figure["summary"] is None:
            verdict = figure["not_measured"] or "not measured"
        lines.append(f"| {figure['label']} | {median} | {spread} | {rounds} | {goal} | {verdict} |")
    return lines


def _timing_lines(report: Mapping[str, Any]) -> list[str]:
    models = report["timings"].get("models", {})
    if not models:
        return []
    lines = ["", "## Step times", "", "| Model | Workload | Median s/step | Range of rounds |"]
    lines.append("|---|---|---|---|")
    for arch, result in models.items():
        for name, summary in result["seconds_per_step"].items():
            low, high = summary["low"], summary["high"]
            lines.append(f"| {arch} | {name} | {summary['median']:.4f} | {low:.4f} - {high:.4f} |")
    transformer = report.get("transformer") or {}
    for name, summary in transformer.get("seconds_per_step", {}).items():
        low, high = summary["low"], summary["high"]
        lines.append(
            f"| text Transformer | {name} | {summary['median']:.4f} | {low:.4f} - {high:.4f} |"
        )
    if transformer:
        lines += ["", f"Text Transformer: {transformer['model']}."]
    collectives = report["collectives"]
    if collectives.get("ops_per_rank"):
        ops = ", ".join(f"`{op}`" for op in collectives["ops_per_rank"][0]) or "none"
        lines += ["", f"Collectives of one `grad_stats` call on rank 0: {ops}."]
    return lines


# What each configuration of the GPU section is (see benchmarks/gpu.py).
_SETUP_MEANING = {
    "as_configured": "what `gradtrace fit --config table1/<row>` runs: no compile",
    "fastest_faithful": (
        "the same plus `torch.compile`: every operation still in fp32 (no TF32, no bf16), "
        "only fused and scheduled differently, which changes the order of floating-point sums "
        "(~1e-6 relative; the GPU fast-path test holds the gradient flow within 1e-4 of eager). "
        "bf16-mixed (~10% on per-layer mean |grad|) and TF32 (~1e-3) would be faster but not "
        "the same experiment"
    ),
}


def _gpu_lines(gpu: Mapping[str, Any]) -> list[str]:
    lines = ["", "## GPU", ""]
    if "skipped" in gpu:
        return [
            *lines,
            f"Skipped: {gpu['skipped']}. On a GPU machine `make gpu-check` (or `make bench`) "
            "adds the epoch times of the Table 1 networks as the configs run them (32-true, "
            "TF32 off, eager) and in the fastest faithful configuration (the same, compiled), "
            "one vs two training processes per GPU and the projected wall time of Table 1 "
            "(7 rows x 100 epochs) for each; goal: under 30 minutes on one H100.",
        ]
    lines += [
        f"Device: {gpu['device']}. Epoch = {gpu['steps_per_epoch']} training steps + "
        f"{gpu['val_batches']} validation batches; training time per epoch projected from "
        f"{gpu['timed_steps']} steady-state steps. Every measurement ran in a process of its "
        "own (a fresh `torch.compile`, a hard time limit).",
        "",
        f"Both configurations keep the configs' settings: precision `{gpu['precision']}`, TF32 "
        f"{gpu['tf32']}, channels_last, the data on the GPU, GradientFlow, checkpoints, the CSV "
        "logger.",
        "",
    ]
    for key, setup in gpu["setups"].items():
        lines.append(f"- **{setup['label']}**: {_SETUP_MEANING.get(key, '')}.")
    lines += [
        "",
        "| Network | Configuration | First epoch (start-up, compile) s | Training s/epoch "
        "| Validation s | Epoch s | Graphs compiled |",
        "|---|---|---|---|---|---|---|",
    ]
    for setup in gpu["setups"].values():
        for name, t in setup["epoch_times"].items():
            lines.append(
                f"| {name} | {setup['label']} | {t['compile_s']:.1f} | {t['train_s']:.2f} "
                f"| {t['val_s']:.2f} | {t['epoch_s']:.2f} | {t['graphs_compiled']} |"
            )
    rows = gpu["rows"]
    epochs = sum(r["epochs"] for r in rows)
    lines += ["", f"Projected Table 1 ({len(rows)} rows, {epochs} epochs in all):", ""]
    for key, setup in gpu["setups"].items():
        projected = setup["rows_projected"]
        line = (
            f"- {setup['label']}, one run at a time: **{setup['table1_minutes']:.1f} min** "
            f"({projected} of {len(rows)} rows measured)"
        )
        if key == "fastest_faithful" and gpu["two_processes_measured"]:
            speedup = gpu["two_processes_speedup"]["median"]
            line += (
                f"; two training processes on one GPU get {speedup:.2f}x the throughput of "
                f"one, so with {gpu['runs_per_gpu']} run(s) per GPU: "
                f"**{gpu['table1_minutes']:.1f} min**"
            )
        # A verdict needs an interval of the median; the projection rests on one timed epoch
        # per network, so it is shown against its goal but judged inconclusive.
        why = "one timed epoch per network gives no interval of the median"
        if projected < len(rows):
            why = f"only {projected} of {len(rows)} rows measured"
        lines.append(f"{line} (goal: under 30 min on one H100: **inconclusive**, {why}).")
    if gpu["cut"]:
        lines += ["", "Cut to keep within the time limit or failed:", ""]
        lines += [f"- {cut}" for cut in gpu["cut"]]
    if gpu.get("gpu_tests"):
        lines += ["", f"GPU-marked tests: {gpu['gpu_tests']}."]
    return lines


def render_markdown(report: Mapping[str, Any]) -> str:
    """The human-readable report: the figures, step times, GPU section, caveats."""
    settings = report["settings"]
    mode = "quick (`make bench QUICK=1`)" if settings.get("quick") else "full (`make bench`)"
    lines = [
        "# gradtrace benchmark",
        "",
        f"- Device: **{report['device']}**",
        f"- Mode: {mode}; took {report['elapsed_s'] / 60:.1f} min",
        f"- Training settings: precision `{settings['precision']}`, channels_last, "
        f"compile {'on' if settings['compile'] else 'off'}, batch {settings['batch_size']}, "
        f"CIFAR-100-shaped synthetic data (100 classes, 3x32x32, a training pool of "
        f"{settings['training_pool']:,} images)",
        f"- Software: {', '.join(f'{k} {v}' for k, v in report['environment'].items())}",
        "",
        "Every figure is a per-round ratio of workloads run one after the other in the same "
        "process (rotating order: A B C, B C A, ...), and the median over the rounds. A goal "
        "is judged on the median's confidence interval: **pass** when all of it meets the "
        "goal, **FAIL** when none does, **inconclusive** when it straddles the goal or is "
        "wider than the goal's margin.",
        "",
        *_figure_rows(report),
        *_timing_lines(report),
        *_gpu_lines(report["gpu"]),
        "",
        "## Caveats",
        "",
        *[f"- {caveat}" for caveat in report["caveats"]],
    ]
    return "\n".join(lines) + "\n"
