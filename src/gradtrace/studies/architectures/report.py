"""The study's markdown report: how each model was trained and fed, what it costs, how it
learned, its gradient profile at initialisation and after training, and a section per claim
with its verdict (:mod:`.claims`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from gradtrace.measure.probe import ProbeResult, median_range
from gradtrace.studies.architectures.claims import SOURCES
from gradtrace.studies.architectures.results import ModelResult, Study
from gradtrace.studies.claims import Claim, claims_count

__all__ = ["format_study_report"]

RECIPE_KEYS = ("optimizer", "lr", "momentum", "weight_decay", "scheduler")
CLAIM_TITLES = {
    "degradation": "Residual connections against degradation",
    "aux": "GoogLeNet's auxiliary classifiers as gradient shortcuts",
    "batch_norm": "Batch normalization without skips at initialisation",
    "seed": "The seed paper's CIFAR-10 VGG",
    "vgg38": "VGG38 without BN or RC",
}


def _profile(result: ProbeResult | None) -> tuple[str, str, str]:
    """(ratio, slope, first dead or saturated layer) cells."""
    if result is None:
        return "no checkpoint", "", ""
    return (
        median_range(result.ratios, ".1e", missing="n/a"),
        median_range(result.slopes, "+.2f", missing="n/a"),
        result.first_problem() or "none",
    )


def _percent(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def _recipe(r: ModelResult) -> str:
    model = r.spec.model
    parts = [f"{model.get('optimizer', 'adam')} lr {model.get('lr', 1e-3):g}"]
    if model.get("optimizer") == "sgd":
        parts.append(f"momentum {model.get('momentum', 0.9):g}")
    if model.get("weight_decay"):
        parts.append(f"L2 {model['weight_decay']:g}")
    parts.append(str(model.get("scheduler", "cosine")))
    return ", ".join(parts)


def _model_table(rows: Sequence[ModelResult]) -> list[str]:
    lines = [
        "| Model | Params | MACs / image | Steps (epochs) | Train loss | Val acc % | "
        "In/out ratio, init | Slope, init | In/out ratio, end | Slope, end | "
        "First dead/saturated, init | ..., end |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        init_ratio, init_slope, init_problem = _profile(r.init)
        end_ratio, end_slope, end_problem = _profile(r.end)
        loss = r.metrics.get("train/loss", math.nan)
        cells = [
            r.spec.label,
            f"{r.params:,}",
            f"{r.macs / 1e6:,.1f} M",
            f"{r.steps} ({r.epochs})",
            "n/a" if not math.isfinite(loss) else f"{loss:.3f}",
            _percent(r.metrics.get("val/acc")),
            init_ratio,
            init_slope,
            end_ratio,
            end_slope,
            init_problem,
            end_problem,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _setup(study: Study) -> list[str]:
    from gradtrace.models import model_info

    rows = study.results
    recipes = sorted({_recipe(r) for r in rows})
    shared = max(recipes, key=lambda recipe: sum(_recipe(r) == recipe for r in rows))
    others = [f"{r.spec.label}: {_recipe(r)}" for r in rows if _recipe(r) != shared]
    sizes = sorted({"x".join(map(str, r.input_size)) for r in rows})
    lines = [
        f"- Budget: **{study.budget}**. Data: {study.data}.",
        f"- Training: every model {shared}, the same steps and batch per dataset"
        + (
            f"; except {'; '.join(dict.fromkeys(others))} (its source's recipe)." if others else "."
        ),
        f"- Input: {', '.join(sizes)} (channels x height x width) for every model.",
        f"- Probes (gradtrace.measure.probe): one training batch of {study.probe_batch} images "
        f"(the same for every probe of a dataset, no augmentation), {len(study.seeds)} seeds "
        "at initialisation (median [min, max]), the trained weights at the end. Layers: the "
        "weights of the main path (auxiliary heads are off it) in data-flow order. Ratio: "
        "first over last layer's mean |grad|; slope: decades of mean |grad| per unit of "
        "relative depth, input to output (positive: the gradient vanishes toward the input).",
        "- Models:",
    ]
    labels: dict[str, list[str]] = {}
    for r in rows:
        names = labels.setdefault(r.spec.arch, [])
        if r.spec.label not in names:
            names.append(r.spec.label)
    for arch, names in labels.items():
        lines.append(f"  - {', '.join(names)} (`{arch}`): {model_info(arch).description}")
    return lines


def format_study_report(
    study: Study,
    claims: Sequence[tuple[str, Sequence[Claim]]],
    figure_paths: Sequence[Path],
    out: Path,
    wall_seconds: float | None = None,
) -> str:
    """The report's markdown."""
    every = [claim for _, group in claims for claim in group]
    lines = [f"# The architecture comparison, reproduced ({study.budget} budget)", ""]
    if "SYNTHETIC" in study.data:
        lines += ["> **WARNING: SYNTHETIC DATA**: these numbers say nothing about real data.", ""]
    if study.budget == "smoke":
        lines += [
            "> **Smoke budget**: minutes on a CPU, on Fashion-MNIST. Claims about the gradient "
            "at initialisation are settled at any budget; claims about training need the full "
            "budget, and where the smoke run does not meet them they are not established.",
            "",
        ]
    lines += _setup(study)
    if wall_seconds is not None:
        lines.append(f"- Wall time: {wall_seconds:.0f} s.")
    lines += ["", f"The claims: {claims_count(every)}.", ""]
    for dataset in study.datasets():
        lines += [f"## Models on {dataset}", ""]
        lines += [*_model_table([r for r in study.results if r.dataset == dataset]), ""]
    lines += ["## Claims", ""]
    for key, group in claims:
        lines += [f"### {CLAIM_TITLES[key]}", "", f"Source: {SOURCES[key]}.", ""]
        lines += [claim.markdown() for claim in group] or ["- not measured: no such models ran"]
        lines.append("")
    lines += ["## Figures", ""]
    for path in figure_paths:
        rel = path.relative_to(out) if path.is_relative_to(out) else path
        lines += [f"![{path.stem}]({rel.as_posix()})", ""]
    sources = [r for r in study.results if r.source is not None]
    if sources:
        lines += ["## Runs", ""]
        for r in sources:
            took = f", {r.seconds:.0f} s" if r.seconds is not None else ""
            lines.append(f"- {r.spec.label} on {r.dataset}{took}: {r.source}")
    return "\n".join(lines) + "\n"
