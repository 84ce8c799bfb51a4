"""``reports/bench.json`` and ``reports/bench.md`` from the bench's measurements.

The JSON's top-level figures (the issue's keys) are medians over rounds, plain numbers:
``device``; ``train_step_ratio`` and ``peak_memory_mb`` per model; ``callback_overhead`` per
method (``gradtrace``, ``grad_norm``, ``wandb_watch``); ``data_speedup_vs_torchvision``;
``data_vs_model``; ``flops_fraction``. ``figures`` repeats each with its spread, rounds, goal
and verdict; the other keys hold the raw timings, scaling, host syncs, the GPU section,
settings and caveats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gradtrace.bench.stats import Summary

__all__ = ["FIGURES", "Figure", "Goal", "build_report", "render_markdown", "to_jsonable"]

TOP_LEVEL_KEYS = (
    "device",
    "train_step_ratio",
    "callback_overhead",
    "data_speedup_vs_torchvision",
    "data_vs_model",
    "peak_memory_mb",
    "flops_fraction",
)


@dataclass(frozen=True)
class Goal:
    """``value <op> threshold``, e.g. ``Goal(">=", 0.95)``."""

    op: str
    threshold: float
    unit: str = ""

    def __post_init__(self) -> None:
        if self.op not in (">=", "<="):
            raise ValueError(f"op must be one of >=, <=; got {self.op!r}")

    def passed(self, value: float) -> bool:
        """Whether ``value`` meets the goal."""
        return value >= self.threshold if self.op == ">=" else value <= self.threshold

    def __str__(self) -> str:
        return f"{'≥' if self.op == '>=' else '≤'} {_number(self.threshold, self.unit)}"


@dataclass(frozen=True)
class Figure:
    """One row of the report: where its summary is, how to show it, its goal."""

    key: str
    label: str
    unit: str  # "x" (ratio), "%" (fraction shown as percent), "MB"
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
        "callback_overhead/gradtrace",
        "GradientFlow logging every step: extra VGG38 step time",
        "%",
        Goal("<=", 0.02, "%"),
    ),
    Figure(
        "callback_hook_fraction/gradtrace",
        "GradientFlow logging every step: time in its hook ÷ VGG38 step time",
        "%",
        Goal("<=", 0.02, "%"),
    ),
    Figure(
        "callback_overhead/grad_norm",
        "Lightning grad_norm logged every step: extra VGG38 step time",
        "%",
    ),
    Figure(
        "callback_hook_fraction/grad_norm",
        "Lightning grad_norm logged every step: time in grad_norm + log_dict ÷ step time",
        "%",
    ),
    Figure(
        "callback_overhead/wandb_watch",
        "wandb.watch(log='gradients', log_freq=1), offline: extra VGG38 step time",
        "%",
    ),
    Figure(
        "callback_hook_fraction/wandb_watch",
        "wandb.watch(log='gradients', log_freq=1), offline: time in its histograms + commit "
        "÷ step time",
        "%",
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
    return f"{value:.3g}"


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
    training: Mapping[str, Any],
    data: Mapping[str, Any],
    memory: Mapping[str, Any],
    scaling: Mapping[str, Any],
    host_syncs: Mapping[str, Any],
    gpu: Mapping[str, Any],
    environment: Mapping[str, Any],
    caveats: list[str],
    elapsed_s: float,
) -> dict[str, Any]:
    """Assemble the report (JSON-ready) from the phases' results."""
    models = training["models"]
    summaries: dict[str, Summary] = {}
    for arch, result in models.items():
        summaries[f"train_step_ratio/{arch}"] = result["train_step_ratio"]
        for kind in ("callback_overhead", "callback_hook_fraction"):
            for name, summary in result.get(kind, {}).items():
                summaries[f"{kind}/{name}"] = summary
        if "flops" in result:
            summaries["flops_fraction"] = result["flops"]["flops_fraction"]
    summaries["data_speedup_vs_torchvision"] = data["speedup"]
    summaries["data_vs_model"] = models["vgg38"]["data_vs_model"]
    for arch, result in memory.items():
        summaries[f"peak_memory_mb/{arch}"] = Summary.of([result["peak_mb"]])

    figures = {}
    for figure in FIGURES:
        summary = summaries.get(figure.key)
        figures[figure.key] = {
            "label": figure.label,
            "unit": figure.unit,
            "goal": None
            if figure.goal is None
            else {"op": figure.goal.op, "threshold": figure.goal.threshold},
            "passed": None
            if figure.goal is None or summary is None
            else figure.goal.passed(summary.median),
            "summary": summary,
        }

    def median(key: str) -> float | None:
        return summaries[key].median if key in summaries else None

    report: dict[str, Any] = {
        "device": device,
        "train_step_ratio": {arch: median(f"train_step_ratio/{arch}") for arch in models},
        "callback_overhead": {
            name: median(f"callback_overhead/{name}")
            for name in ("gradtrace", "grad_norm", "wandb_watch")
        },
        "callback_hook_fraction": {
            name: median(f"callback_hook_fraction/{name}")
            for name in ("gradtrace", "grad_norm", "wandb_watch")
        },
        "data_speedup_vs_torchvision": median("data_speedup_vs_torchvision"),
        "data_vs_model": median("data_vs_model"),
        "peak_memory_mb": {arch: median(f"peak_memory_mb/{arch}") for arch in memory},
        "flops_fraction": median("flops_fraction"),
        "figures": figures,
        "timings": training,
        "data": data,
        "memory": memory,
        "scaling": scaling,
        "host_syncs": host_syncs,
        "gpu": gpu,
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
    spread = f"{_number(summary['low'], unit)} - {_number(summary['high'], unit)}"
    return median, spread, str(summary["rounds"])


def render_markdown(report: Mapping[str, Any]) -> str:
    """The human-readable report: a table of figures, then scaling, syncs, GPU, caveats."""
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
        f"{report['settings']['training_pool']:,} images)",
        f"- Software: {', '.join(f'{k} {v}' for k, v in report['environment'].items())}",
        "",
        "Every figure is a per-round ratio of workloads run one after the other in the same "
        "process (rotating order: A B C, B C A, ...), and the median over the rounds; the "
        "spread is the lowest and highest round.",
        "",
        "| Figure | Median | Spread (low - high) | Rounds | Goal | Result |",
        "|---|---|---|---|---|---|",
    ]
    for figure in report["figures"].values():
        unit = figure["unit"]
        median, spread, rounds = _spread(figure["summary"], unit)
        goal = "-" if figure["goal"] is None else str(Goal(**figure["goal"], unit=unit))
        result = "-"
        if figure["passed"] is not None:
            result = "**pass**" if figure["passed"] else "**FAIL**"
        elif figure["summary"] is None:
            result = "not measured"
        lines.append(f"| {figure['label']} | {median} | {spread} | {rounds} | {goal} | {result} |")

    lines += ["", "## Step times", "", "| Model | Workload | Median s/step | Spread |"]
    lines.append("|---|---|---|---|")
    for arch, result in report["timings"]["models"].items():
        for name, summary in result["seconds_per_step"].items():
            low, high = summary["low"], summary["high"]
            lines.append(f"| {arch} | {name} | {summary['median']:.4f} | {low:.4f} - {high:.4f} |")
    overhead = report["timings"].get("host_overhead")
    if overhead:
        extra = overhead["extra_seconds_per_step"]
        plain = overhead["seconds_per_step"]["plain"]["median"]
        lines += [
            "",
            f"Host time Lightning adds per step (tiny network, width 4, batch 2, "
            f"{overhead['torch_threads']} torch thread(s), "
            f"{extra['rounds']} rounds of {overhead['block']} steps): "
            f"**{1e3 * extra['median']:.2f} ms** ({1e3 * extra['low']:.2f} - "
            f"{1e3 * extra['high']:.2f}) over the plain loop's {1e3 * plain:.2f} ms. A step "
            "that takes less device time than this is limited by the host.",
        ]
    flops = report["timings"]["models"].get("vgg38", {}).get("flops")
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
            f" ImageDataModule with one torch thread: {rates['gradtrace_1_thread']['median']:,.0f}"
            f" batches/s, {data['speedup_1_thread']['median']:,.1f}x torchvision."
        )

    lines += ["", "## Scaling", ""]
    scaling = report["scaling"]
    if "skipped" in scaling:
        lines.append(f"Skipped: {scaling['skipped']}.")
    else:
        n = scaling["processes"]
        one, many = scaling["images_per_s"]["1"], scaling["images_per_s"][str(n)]
        lines += [
            f"{scaling['arch']}, DDP ({scaling['backend']}), batch "
            f"{scaling['per_process_batch']} per process:",
            "",
            "| Processes | Threads each | Images/s (median) |",
            "|---|---|---|",
            f"| 1 | {scaling['threads_per_process']['1']} | {one['median']:,.0f} |",
            f"| {n} | {scaling['threads_per_process'][str(n)]} | {many['median']:,.0f} |",
            "",
            f"Speed-up with {n} processes: {scaling['speedup']['median']:.2f}x "
            f"({scaling['speedup']['rounds']} round(s)).",
        ]
    lines += [
        "",
        "What to expect with N GPUs: these networks are small, so the efficient use of N "
        "GPUs is N independent runs, not one run spread over them. "
        "`make sweep-local SWEEP=... GPUS=0,1,2,3` (and `make reproduce-table1`'s `--gpus`) "
        "runs one cell per listed GPU at a time, each with `CUDA_VISIBLE_DEVICES` set; a GPU "
        "listed twice (`GPUS=0,0,1,1`) runs two cells on it, which pays off when the GPU "
        "section below shows two processes getting more done than one. N GPUs then finish "
        "N (or 2N) runs in about the time of one: Table 1's 7 rows take ceil(7/N) run "
        "times. DDP over N GPUs (`--trainer.devices N --trainer.strategy ddp`) instead "
        "multiplies the global batch by N and all-reduces the gradients every step; for "
        "VGG-sized networks the all-reduce is small, so images/s grow nearly N-fold, but the "
        "run then trains with an N-times larger batch (different results from Table 1's). "
        "On a CPU, DDP processes share the same cores: no more arithmetic gets done, and a "
        "figure above 1x here means one process's two threads lost time waiting for each "
        "other on a busy machine (see the caveats).",
    ]

    lines += ["", "## Host syncs per training step", ""]
    syncs = report["host_syncs"]
    lines += [
        "Ops that make the host wait for a GPU (`.item()`, data-dependent shapes, copies to "
        "the host, blocking copies to the device), counted "
        "with a dispatch mode over steady-state steps of a small model with gradtrace's "
        "defaults, by the code that issued them:",
        "",
        "| Step | Per step | Source |",
        "|---|---|---|",
    ]
    for kind, counts in syncs.items():
        if not counts:
            lines.append(f"| {kind.replace('_', ' ')} | 0 | - |")
        for source, count in counts.items():
            lines.append(f"| {kind.replace('_', ' ')} | {count:g} | `{source}` |")

    lines += ["", "## GPU", ""]
    gpu = report["gpu"]
    if "skipped" in gpu:
        lines.append(
            f"Skipped: {gpu['skipped']}. On a GPU machine `make bench` adds the epoch times of "
            "the Table 1 networks (bf16-mixed, channels_last, compile, data on the GPU) and the "
            "projected wall time of Table 1 (7 rows x 100 epochs); goal: under 30 minutes on "
            "one H100."
        )
    else:
        lines += [
            f"Device: {gpu['device']}. Epoch = 475 training steps + 25 validation batches.",
            "",
            "| Network | First epoch (compile) s | Epoch s |",
            "|---|---|---|",
        ]
        for name, times in gpu["epoch_times"].items():
            lines.append(f"| {name} | {times['first_epoch_s']:.1f} | {times['epoch_s']:.2f} |")
        speedup = gpu["two_processes_speedup"]["median"]
        minutes = gpu["table1_minutes"]
        verdict = "pass" if minutes < 30 else "FAIL"
        lines += [
            "",
            f"Two training processes on one GPU: {speedup:.2f}x the throughput of one.",
            f"Projected Table 1 (7 rows x 100 epochs): "
            f"{gpu['table1_minutes_one_run_at_a_time']:.1f} min one run at a time; "
            f"**{minutes:.1f} min** with {gpu['runs_per_gpu']} run(s) per GPU "
            f"(goal: under 30 min on one H100: **{verdict}**).",
        ]

    lines += ["", "## Caveats", ""]
    lines += [f"- {caveat}" for caveat in report["caveats"]]
    return "\n".join(lines) + "\n"
