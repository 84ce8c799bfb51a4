"""``reports/bench.json`` and ``reports/bench.md`` from the bench's measurements.

The JSON's top-level figures are medians over rounds, plain numbers: ``device``;
``train_step_ratio`` and ``peak_memory_mb`` per model; ``callback_hook_fraction`` (the cost
of each callback: time inside it ÷ step time) and ``callback_overhead`` (difference of step
times) per method; ``data_speedup_vs_torchvision``; ``data_vs_model``; ``flops_fraction``;
``collectives_per_logged_step``. ``figures`` repeats each with its spread, the median's
confidence interval, goal and verdict; the other keys hold the raw timings, the GPU section,
settings and caveats.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.stats import Summary

__all__ = [
    "FIGURES",
    "Figure",
    "Goal",
    "build_report",
    "render_markdown",
    "to_jsonable",
    "write_reports",
]

TOP_LEVEL_KEYS = (
    "device",
    "train_step_ratio",
    "callback_hook_fraction",
    "callback_overhead",
    "data_speedup_vs_torchvision",
    "data_vs_model",
    "peak_memory_mb",
    "flops_fraction",
    "collectives_per_logged_step",
)
CALLBACK_KEYS = (
    "gradtrace",
    "grad_norm",
    "wandb_watch",
    "activations_every_step",
    "activations_every_50",
)
VERDICTS = ("pass", "FAIL", "inconclusive")


@dataclass(frozen=True)
class Goal:
    """``value <op> threshold``, e.g. ``Goal(">=", 0.95, "x")``, judged on an interval.

    ``unit`` says where "no effect" is: 0 for a fraction (``"%"``), 1 for a ratio (``"x"``),
    0 for a count. The goal's *margin* is the threshold's distance from it (2 percentage
    points for ``<= 2%``, 0.05 for ``>= 0.95x``). ``==`` is for exact counts.
    """

    op: str
    threshold: float
    unit: str = ""

    def __post_init__(self) -> None:
        if self.op not in (">=", "<=", "=="):
            raise ValueError(f"op must be one of >=, <=, ==; got {self.op!r}")

    @property
    def margin(self) -> float:
        """How wide an interval may be and still decide the goal."""
        return abs(self.threshold - (1.0 if self.unit == "x" else 0.0))

    def verdict(self, low: float, high: float) -> str:
        """``pass``, ``FAIL`` or ``inconclusive`` for a median known to lie in [low, high].

        Inconclusive when the interval straddles the threshold or is wider than the margin:
        a figure that cannot tell 0% from 2% says nothing about a 2% goal, whichever side
        its median falls on.
        """
        if self.op == "==":
            if low == high:
                return "pass" if low == self.threshold else "FAIL"
            return "inconclusive"
        if high - low > self.margin:
            return "inconclusive"
        meets = (
            (lambda v: v >= self.threshold) if self.op == ">=" else (lambda v: v <= self.threshold)
        )
        if meets(low) and meets(high):
            return "pass"
        if not meets(low) and not meets(high):
            return "FAIL"
        return "inconclusive"

    def __str__(self) -> str:
        symbol = {">=": "≥", "<=": "≤", "==": "="}[self.op]
        return f"{symbol} {_number(self.threshold, self.unit)}"


@dataclass(frozen=True)
class Figure:
    """One row of the report: where its summary is, how to show it, its goal."""

    key: str
    label: str
    unit: str  # "x" (ratio), "%" (fraction shown as percent), "MB", "" (a count)
    goal: Goal | None = None


FIGURES: tuple[Figure, ...] = (
    Figure(
        "train_step_ratio/vgg08",
        "Training step, gradtrace ÷ plain PyTorch (throughput), VGG08",
        "x",
        Goal(">=", 0.95, "x"),
    ),
    Figure(
        "train_step_ratio/vgg38",
        "Training step, gradtrace ÷ plain PyTorch (throughput), VGG38",
        "x",
        Goal(">=", 0.95, "x"),
    ),
    Figure(
        "callback_hook_fraction/gradtrace",
        "GradientFlow measuring every step: time in its hooks ÷ VGG38 step time",
        "%",
        Goal("<=", 0.02, "%"),
    ),
    Figure(
        "callback_hook_fraction/activations_every_50",
        "GradientFlow(activations=True) measuring every 50 steps: time in its hooks ÷ "
        "VGG38 step time",
        "%",
        Goal("<=", 0.03, "%"),
    ),
    Figure(
        "callback_hook_fraction/activations_every_step",
        "GradientFlow(activations=True) measuring every step: time in its hooks ÷ VGG38 step time",
        "%",
    ),
    Figure(
        "callback_hook_fraction/grad_norm",
        "Lightning grad_norm logged every step: time in grad_norm + log_dict ÷ step time",
        "%",
    ),
    Figure(
        "callback_hook_fraction/wandb_watch",
        "wandb.watch(log='gradients', log_freq=1), offline: time in its histograms + commit "
        "÷ step time",
        "%",
    ),
    Figure(
        "callback_overhead/gradtrace",
        "GradientFlow measuring every step: extra VGG38 step time (difference of step times)",
        "%",
    ),
    Figure(
        "callback_overhead/grad_norm",
        "Lightning grad_norm logged every step: extra VGG38 step time",
        "%",
    ),
    Figure(
        "callback_overhead/wandb_watch",
        "wandb.watch(log='gradients', log_freq=1), offline: extra VGG38 step time",
        "%",
    ),
    Figure(
        "collectives_per_logged_step",
        "Collectives per logged step, grad_stats on an FSDP2 model (2 gloo processes)",
        "",
        Goal("==", 1, ""),
    ),
    Figure(
        "data_speedup_vs_torchvision",
        "Data pipeline, ImageDataModule ÷ torchvision DataLoader (2 workers), batches/s",
        "x",
        Goal(">=", 5.0, "x"),
    ),
    Figure(
        "data_vs_model",
        "Data pipeline batches/s ÷ VGG38 training steps/s",
        "x",
        Goal(">=", 10.0, "x"),
    ),
    Figure("peak_memory_mb/vgg08", "Peak training memory, VGG08, batch 100", "MB"),
    Figure("peak_memory_mb/vgg38", "Peak training memory, VGG38, batch 100", "MB"),
    Figure(
        "flops_fraction",
        "VGG38 training step FLOP/s ÷ dense matmul FLOP/s",
        "%",
    ),
)


def _number(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "%":
        return f"{100 * value:.2f}%"
    if unit == "MB":
        return f"{value:,.0f} MB"
    if unit == "x":
        return f"{value:,.3g}x" if abs(value) < 100 else f"{value:,.0f}x"
    return f"{value:g}"


def to_jsonable(value: Any) -> Any:
    """Summaries to dicts, tuples to lists, non-finite floats to None, recursively."""
    if isinstance(value, Summary):
        return to_jsonable(value.to_dict())
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def build_report(
    *,
    device: str,
    settings: Mapping[str, Any],
    environment: Mapping[str, Any],
    caveats: list[str],
    elapsed_s: float,
    training: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    memory: Mapping[str, Any] | None = None,
    collectives: Mapping[str, Any] | None = None,
    gpu: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the report (JSON-ready) from the sections' results; any may be missing."""
    models = (training or {}).get("models", {})
    summaries: dict[str, Summary] = {}
    not_measured: dict[str, str] = {}
    for arch, result in models.items():
        summaries[f"train_step_ratio/{arch}"] = result["train_step_ratio"]
        for kind in ("callback_overhead", "callback_hook_fraction"):
            for name, summary in result.get(kind, {}).items():
                summaries[f"{kind}/{name}"] = summary
        for name, why in result.get("not_measured", {}).items():
            not_measured[f"callback_hook_fraction/{name}"] = why
            not_measured[f"callback_overhead/{name}"] = why
        if "flops" in result:
            summaries["flops_fraction"] = result["flops"]["flops_fraction"]
        if "data_vs_model" in result:
            summaries["data_vs_model"] = result["data_vs_model"]
    if data:
        summaries["data_speedup_vs_torchvision"] = data["speedup"]
    for arch, result in (memory or {}).items():
        summaries[f"peak_memory_mb/{arch}"] = Summary.of([result["peak_mb"]])
    if collectives and "not_available" in collectives:
        not_measured["collectives_per_logged_step"] = collectives["not_available"]
    elif collectives:
        count = collectives["collectives_per_logged_step"]
        summaries["collectives_per_logged_step"] = Summary.of([count])

    figures = {}
    for figure in FIGURES:
        summary = summaries.get(figure.key)
        verdict = None
        if figure.goal is not None and summary is not None:
            low, high = (summary.ci_low, summary.ci_high)
            if figure.goal.op == "==":  # an exact count: the one value is the interval
                low = high = summary.median
            verdict = figure.goal.verdict(low, high)
        figures[figure.key] = {
            "label": figure.label,
            "unit": figure.unit,
            "goal": None
            if figure.goal is None
            else {"op": figure.goal.op, "threshold": figure.goal.threshold},
            "verdict": verdict,
            "not_measured": not_measured.get(figure.key) if summary is None else None,
            "summary": summary,
        }

    def median(key: str) -> float | None:
        return summaries[key].median if key in summaries else None

    report: dict[str, Any] = {
        "device": device,
        "train_step_ratio": {arch: median(f"train_step_ratio/{arch}") for arch in models},
        "callback_hook_fraction": {
            name: median(f"callback_hook_fraction/{name}") for name in CALLBACK_KEYS
        },
        "callback_overhead": {
            name: median(f"callback_overhead/{name}") for name in CALLBACK_KEYS[:3]
        },
        "data_speedup_vs_torchvision": median("data_speedup_vs_torchvision"),
        "data_vs_model": median("data_vs_model"),
        "peak_memory_mb": {arch: median(f"peak_memory_mb/{arch}") for arch in memory or {}},
        "flops_fraction": median("flops_fraction"),
        "collectives_per_logged_step": median("collectives_per_logged_step"),
        "figures": figures,
        "timings": dict(training or {}),
        "data": dict(data or {}),
        "memory": dict(memory or {}),
        "collectives": dict(collectives or {}),
        "gpu": dict(gpu or {"skipped": "not run"}),
        "settings": dict(settings),
        "environment": dict(environment),
        "caveats": caveats,
        "elapsed_s": elapsed_s,
    }
    return to_jsonable(report)


def _spread(summary: Mapping[str, Any] | None, unit: str) -> tuple[str, str, str]:
    if summary is None:
        return "n/a", "n/a", "0"
    median = _number(summary["median"], unit)
    if summary["rounds"] == 1:
        return median, "-", "1"
    interval = f"{_number(summary['ci_low'], unit)} - {_number(summary['ci_high'], unit)}"
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
    flops = models.get("vgg38", {}).get("flops")
    if flops:
        lines += [
            "",
            f"VGG38 training step: {flops['train_step_flops'] / 1e9:.1f} GFLOP "
            "(forward + backward, `torch.utils.flop_counter`), "
            f"{flops['train_step_flops_per_s']['median'] / 1e9:.1f} GFLOP/s; dense "
            f"{flops['matmul_size']}x{flops['matmul_size']} matmul (best of 5 tries per round): "
            f"{flops['matmul_flops_per_s']['median'] / 1e9:.1f} GFLOP/s.",
        ]
    data = report["data"]
    if data:
        rates = data["batches_per_s"]
        lines += [
            "",
            f"Data pipeline: ImageDataModule {rates['gradtrace']['median']:,.0f} batches/s "
            f"({data['threads']} torch threads), torchvision DataLoader "
            f"({data['torchvision_workers']} workers) {rates['torchvision']['median']:,.0f} "
            f"batches/s ({data['batches_per_round']} batches per round).",
        ]
        if "speedup_1_thread" in data:
            lines[-1] += (
                " ImageDataModule with one torch thread: "
                f"{rates['gradtrace_1_thread']['median']:,.0f} batches/s, "
                f"{data['speedup_1_thread']['median']:,.1f}x torchvision."
            )
    collectives = report["collectives"]
    if collectives.get("ops_per_rank"):
        ops = ", ".join(f"`{op}`" for op in collectives["ops_per_rank"][0]) or "none"
        lines += ["", f"Collectives of one `grad_stats` call on rank 0: {ops}."]
    return lines


def _gpu_lines(gpu: Mapping[str, Any]) -> list[str]:
    lines = ["", "## GPU", ""]
    if "skipped" in gpu:
        return [
            *lines,
            f"Skipped: {gpu['skipped']}. On a GPU machine `make gpu-check` (or `make bench`) "
            "adds the epoch times of the Table 1 networks (bf16-mixed, channels_last, compile, "
            "data on the GPU), one vs two training processes per GPU and the projected wall "
            "time of Table 1 (7 rows x 100 epochs); goal: under 30 minutes on one H100.",
        ]
    lines += [
        f"Device: {gpu['device']}. Epoch = {gpu['steps_per_epoch']} training steps + "
        f"{gpu['val_batches']} validation batches; training time per epoch projected from "
        f"{gpu['timed_steps']} steady-state steps.",
        "",
        "| Network | First steps (compile) s | Training s/epoch | Validation s | Epoch s |",
        "|---|---|---|---|---|",
    ]
    for name, t in gpu["epoch_times"].items():
        lines.append(
            f"| {name} | {t['compile_s']:.1f} | {t['train_s']:.2f} | {t['val_s']:.2f} "
            f"| {t['epoch_s']:.2f} |"
        )
    speedup = gpu["two_processes_speedup"]["median"]
    minutes = gpu["table1_minutes"]
    verdict = "pass" if minutes < 30 else "FAIL"
    lines += [
        "",
        f"Two training processes on one GPU: {speedup:.2f}x the throughput of one.",
        f"Projected Table 1 ({len(gpu['rows'])} rows, "
        f"{sum(r['epochs'] for r in gpu['rows'])} epochs in all): "
        f"{gpu['table1_minutes_one_run_at_a_time']:.1f} min one run at a time; "
        f"**{minutes:.1f} min** with {gpu['runs_per_gpu']} run(s) per GPU "
        f"(goal: under 30 min on one H100: **{verdict}**).",
    ]
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


def write_reports(report: Mapping[str, Any], out: Path) -> None:
    """Write ``out/bench.json`` and ``out/bench.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(render_markdown(report))
