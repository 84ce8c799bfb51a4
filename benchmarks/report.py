"""``reports/bench.json`` and ``reports/bench.md`` from the bench's measurements.

The JSON's top-level figures are medians over rounds, plain numbers: ``device``;
``train_step_ratio`` per model; ``callback_hook_fraction`` (the cost of each callback: time
inside it ÷ step time) per callback; ``collectives_per_logged_step``. ``figures`` repeats
each with its spread, the median's confidence interval, goal and verdict; the other keys hold
the raw timings, the GPU section, settings and caveats.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks.figures import FIGURES
from benchmarks.markdown import render_markdown
from benchmarks.stats import Summary

__all__ = ["build_report", "to_jsonable", "write_reports"]

TOP_LEVEL_KEYS = (
    "device",
    "train_step_ratio",
    "callback_hook_fraction",
    "collectives_per_logged_step",
)
CALLBACK_KEYS = (
    "gradtrace",
    "grad_norm",
    "wandb_watch",
    "activations_every_step",
    "activations_every_50",
    "flight_recorder",
)


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
    collectives: Mapping[str, Any] | None = None,
    gpu: Mapping[str, Any] | None = None,
    transformer: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the report (JSON-ready) from the sections' results; any may be missing."""
    models = (training or {}).get("models", {})
    summaries: dict[str, Summary] = {}
    not_measured: dict[str, str] = {}
    for arch, result in models.items():
        summaries[f"train_step_ratio/{arch}"] = result["train_step_ratio"]
        for name, summary in result.get("callback_hook_fraction", {}).items():
            summaries[f"callback_hook_fraction/{name}"] = summary
        for name, why in result.get("not_measured", {}).items():
            not_measured[f"callback_hook_fraction/{name}"] = why
    if transformer:
        summaries["transformer/train_step_ratio"] = transformer["train_step_ratio"]
        summaries["transformer/unmeasured_step_us"] = transformer["unmeasured_step_us"]
        for name, summary in transformer["callback_hook_fraction"].items():
            summaries[f"transformer/{name}"] = summary
    if collectives:
        count = collectives["collectives_per_logged_step"]
        summaries["collectives_per_logged_step"] = Summary.of([count])

    figures = {}
    for figure in FIGURES:
        summary = summaries.get(figure.key)
        verdict = None
        if figure.goal is not None and summary is not None:
            if figure.goal.op == "==":  # an exact count: the one value is the interval
                verdict = figure.goal.verdict(summary.median, summary.median)
            else:
                verdict = figure.goal.verdict(summary.ci_low, summary.ci_high, summary.ci_coverage)
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
        "collectives_per_logged_step": (collectives or {}).get("collectives_per_logged_step"),
        "figures": figures,
        "timings": dict(training or {}),
        "transformer": dict(transformer or {}),
        "collectives": dict(collectives or {}),
        "gpu": dict(gpu or {"skipped": "not run"}),
        "settings": dict(settings),
        "environment": dict(environment),
        "caveats": caveats,
        "elapsed_s": elapsed_s,
    }
    return to_jsonable(report)


def write_reports(report: Mapping[str, Any], out: Path) -> None:
    """Write ``out/bench.json`` and ``out/bench.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(render_markdown(report))
