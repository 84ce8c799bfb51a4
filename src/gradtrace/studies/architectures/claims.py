"""The sources' claims about the compared architectures, checked on what the study measured.

Each claim holds, does not hold, or is not established at the budget
(:class:`gradtrace.studies.claims.Claim`). Claims about the gradient at initialisation are
measured on controlled probes and settle at any budget; claims about training are settled by
a full budget, and at the smoke budget a training claim that is not met is reported as not
established, with the budget as the reason (a few hundred steps on Fashion-MNIST are not the
papers' training).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from gradtrace.studies.architectures.probes import EARLY_FRACTION, DepthPoint
from gradtrace.studies.architectures.results import ModelResult, Study
from gradtrace.studies.claims import (
    AT_CHANCE_BELOW,
    COLLAPSED_BELOW,
    DOES_NOT_HOLD,
    HOLDS,
    NOT_ESTABLISHED,
    SETTLING_STEPS,
    Claim,
)

__all__ = ["SEED_PAPER_ACCURACY", "SOURCES", "check_study"]

# The deepest batch-normalised network without skips: its gradient has grown by a decade.
GROWN_ABOVE = 10.0
# "Stable Backpropagation in Deep Image Recognition", its CIFAR-10 VGG: train, validation (%).
SEED_PAPER_ACCURACY = (46.88, 48.46)
SOURCES = {
    "degradation": '"Deep Residual Learning for Image Recognition" (He et al. 2016), Figure 6',
    "aux": '"Going Deeper with Convolutions" (Szegedy et al. 2015); the lecture notes on CNN '
    "architectures, auxiliary classifiers",
    "batch_norm": '"A Mean Field Theory of Batch Normalization" (Yang et al. 2019)',
    "seed": '"Stable Backpropagation in Deep Image Recognition: A VGGNet-Centered Analysis with '
    'Modern AI Perspectives", section IV',
    "vgg38": "MLP Coursework 2 report, Table 1",
}


def _by_key(study: Study, dataset: str) -> dict[str, ModelResult]:
    return {r.spec.key: r for r in study.results if r.dataset == dataset}


def _training_verdict(study: Study, holds: bool, steps: int) -> tuple[str, str]:
    """Verdict of a claim about training. Before :data:`SETTLING_STEPS` steps nothing about
    training is settled; at the smoke budget, a claim that is not met is not established (the
    budget is why)."""
    if steps < SETTLING_STEPS:
        return NOT_ESTABLISHED, f"{steps} of the {SETTLING_STEPS} steps a training claim needs"
    if holds:
        return HOLDS, ""
    if study.budget == "smoke":
        return NOT_ESTABLISHED, f"{steps} steps of a smoke run, far from the source's training"
    return DOES_NOT_HOLD, ""


def degradation_claims(study: Study) -> list[Claim]:
    """Per dataset and deep depth D: plain-D's final training loss is above plain-20's, and
    ResNet-D's is not above ResNet-20's."""
    claims = []
    for dataset in study.datasets():
        rows = _by_key(study, dataset)
        for depth in (56, 110):
            keys = ("plain20", f"plain{depth}", "resnet20", f"resnet{depth}")
            if not all(k in rows for k in keys):
                continue
            p20, pd, r20, rd = (rows[k].metrics.get("train/loss", math.nan) for k in keys)
            name = f"plain-{depth} trains worse than plain-20, ResNet-{depth} does not ({dataset})"
            evidence = (
                f"final training loss: plain-20 {p20:.3f}, plain-{depth} {pd:.3f}; "
                f"ResNet-20 {r20:.3f}, ResNet-{depth} {rd:.3f}"
            )
            if not all(math.isfinite(v) for v in (p20, pd, r20, rd)):
                claims.append(Claim(name, evidence, NOT_ESTABLISHED, "no training loss recorded"))
                continue
            steps = min(rows[k].steps for k in keys)
            verdict, reason = _training_verdict(study, pd > p20 and rd <= r20, steps)
            claims.append(Claim(name, evidence, verdict, reason))
    return claims


def aux_claim(study: Study) -> list[Claim]:
    """For each GoogLeNet with heads: its auxiliary losses raise the early layers' mean |grad|
    at initialisation (the same weights, heads weighted 0.3 against 0)."""
    claims = []
    for label, control in study.aux.items():
        gains = control.early_gains()
        layers = len(control.with_aux.layers)
        early = max(1, int(layers * EARLY_FRACTION))
        evidence = (
            f"mean |grad| of the first {early} of {layers} main-path layers with the auxiliary "
            f"losses over without them, same weights: x{control.early_gain:.3f} (median of "
            f"{len(gains)} seeds, range {min(gains):.3f}-{max(gains):.3f})"
        )
        name = f"GoogLeNet's auxiliary classifiers strengthen the early layers' gradient ({label})"
        claims.append(Claim(name, evidence, HOLDS if control.early_gain > 1 else DOES_NOT_HOLD))
    return claims


def _log_ratio(point: DepthPoint) -> float:
    return math.log10(point.result.ratio) if point.result.ratio > 0 else math.nan


def _growth_per_layer(points: Sequence[DepthPoint]) -> float:
    """Least-squares slope of log10 of the ratio against depth: decades per weight layer."""
    xs = [p.depth for p in points]
    ys = [_log_ratio(p) for p in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread


def batch_norm_claim(study: Study) -> list[Claim]:
    """In each family of the depth series: without skips, the input/output ratio at
    initialisation rises with depth (a least-squares slope of its log over depth above 0) to
    more than 10 at the deepest network; with skips, the deepest network's ratio is closer to 1
    (in decades) than without."""
    families = list(dict.fromkeys(p.family for p in study.depth))
    parts, holds = [], True
    for family in families:
        plain = sorted(
            (p for p in study.depth if p.family == family and not p.residual),
            key=lambda p: p.depth,
        )
        if len(plain) < 2:
            continue
        skip = {p.depth: p for p in study.depth if p.family == family and p.residual}
        growth = _growth_per_layer(plain)
        deepest = plain[-1]
        rising = growth > 0 and deepest.result.ratio > GROWN_ABOVE
        flatter = deepest.depth in skip and abs(_log_ratio(skip[deepest.depth])) < abs(
            _log_ratio(deepest)
        )
        holds = holds and rising and flatter
        listed = ", ".join(
            f"{p.depth}: {p.result.ratio:.1e}"
            + (f" / {skip[p.depth].result.ratio:.1e}" if p.depth in skip else "")
            for p in plain
        )
        parts.append(
            f"{family} (depth: without / with skips) {listed}; without skips "
            f"{growth:+.3f} decades per layer"
        )
    if not parts:
        return []
    evidence = "input/output ratio at initialisation, " + "; ".join(parts)
    name = (
        "with batch normalization and no skips the gradient grows toward the input, more with "
        "depth; skip connections keep it nearer flat"
    )
    return [Claim(name, evidence, HOLDS if holds else DOES_NOT_HOLD)]


def seed_paper_claim(study: Study) -> list[Claim]:
    """The seed paper's CIFAR-10 VGG reaches its reported training and validation accuracy."""
    train_ref, val_ref = SEED_PAPER_ACCURACY
    name = (
        f"the seed paper's CIFAR-10 VGG reaches {train_ref}% train / {val_ref}% validation accuracy"
    )
    row = _by_key(study, "cifar10").get("vgg_cifar10")
    if row is None:
        trained = [r for r in study.results if r.spec.key == "vgg_cifar10"]
        measured = "not trained"
        if trained:
            acc = 100 * trained[0].metrics.get("val/acc", math.nan)
            measured = f"on {trained[0].dataset}: val acc {acc:.1f}%"
        return [Claim(name, measured, NOT_ESTABLISHED, "needs CIFAR-10 at the full budget")]
    train = 100 * row.metrics.get("train/acc", math.nan)
    val = 100 * row.metrics.get("val/acc", math.nan)
    evidence = f"train acc {train:.2f}%, val acc {val:.2f}% after {row.epochs} epochs"
    if not (math.isfinite(train) and math.isfinite(val)):
        return [Claim(name, evidence, NOT_ESTABLISHED, "no training or validation accuracy")]
    verdict, reason = _training_verdict(study, train >= train_ref and val >= val_ref, row.steps)
    return [Claim(name, evidence, verdict, reason)]


def vgg38_claims(study: Study) -> list[Claim]:
    """Plain VGG38 (neither BN nor RC): its gradient at initialisation is collapsed at the
    input (ratio below 1e-3), and it stays at chance after training."""
    claims = []
    for dataset in study.datasets():
        row = _by_key(study, dataset).get("vgg38")
        if row is None:
            continue
        ratio = row.init.ratio
        claims.append(
            Claim(
                f"plain VGG38's gradient at initialisation collapses toward the input ({dataset})",
                f"input/output ratio {ratio:.1e} (< {COLLAPSED_BELOW:g})",
                HOLDS if ratio < COLLAPSED_BELOW else DOES_NOT_HOLD,
            )
        )
        chance = 1 / row.num_classes
        acc = row.metrics.get("val/acc", math.nan)
        name = f"plain VGG38 stays at chance ({dataset})"
        evidence = f"val acc {100 * acc:.1f}% after {row.steps} steps (chance {100 * chance:.0f}%)"
        if not math.isfinite(acc):
            claims.append(Claim(name, evidence, NOT_ESTABLISHED, "no validation accuracy"))
        else:
            verdict, reason = _training_verdict(study, acc < AT_CHANCE_BELOW * chance, row.steps)
            claims.append(Claim(name, evidence, verdict, reason))
    return claims


CHECKS: Sequence[tuple[str, Callable[[Study], list[Claim]]]] = (
    ("degradation", degradation_claims),
    ("aux", aux_claim),
    ("batch_norm", batch_norm_claim),
    ("seed", seed_paper_claim),
    ("vgg38", vgg38_claims),
)


def check_study(study: Study) -> list[tuple[str, list[Claim]]]:
    """Every claim, grouped by source key (see :data:`SOURCES`), in the report's order."""
    return [(key, check(study)) for key, check in CHECKS]
