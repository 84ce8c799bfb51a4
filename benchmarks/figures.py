"""The figures of the report: what each shows, its goal, and how a goal is judged."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["FIGURES", "MIN_COVERAGE", "Figure", "Goal", "number"]

VERDICTS = ("pass", "FAIL", "inconclusive")
MIN_COVERAGE = 0.9
"""A verdict needs an interval that holds the median at least this often (5 rounds)."""


@dataclass(frozen=True)
class Goal:
    """``value <op> threshold``, e.g. ``Goal(">=", 0.95, "x")``, judged on an interval.

    A goal is decided only by an interval narrower than the goal itself: its *margin* is the
    threshold's distance from "no effect", on the figure's own scale. Fractions (``"%"``)
    are additive: ``<= 2%`` has a margin of 2 percentage points. Ratios (``"x"``) are
    multiplicative: the margin and the interval's width are measured in logs, so ``>= 0.95x``
    needs an interval whose high/low is under 1/0.95. ``==`` is
    for exact counts.
    """

    op: str
    threshold: float
    unit: str = ""

    def __post_init__(self) -> None:
        if self.op not in (">=", "<=", "=="):
            raise ValueError(f"op must be one of >=, <=, ==; got {self.op!r}")

    def _width_and_margin(self, low: float, high: float) -> tuple[float, float]:
        if self.unit == "x":
            width = math.log(high / low) if low > 0 else math.inf
            return width, abs(math.log(self.threshold))
        return high - low, abs(self.threshold)

    def verdict(self, low: float, high: float, coverage: float = 1.0) -> str:
        """``pass``, ``FAIL`` or ``inconclusive`` for a median that lies in [low, high] with
        probability ``coverage``.

        Inconclusive when the interval straddles the threshold, is wider than the margin (a
        figure that cannot tell 0% from 2% says nothing about a 2% goal, whichever side its
        median falls on), or holds the median with less than :data:`MIN_COVERAGE`.
        """
        if self.op == "==":
            if low == high:
                return "pass" if low == self.threshold else "FAIL"
            return "inconclusive"
        width, margin = self._width_and_margin(low, high)
        if width > margin or coverage < MIN_COVERAGE:
            return "inconclusive"
        if self.op == ">=":
            meets_low, meets_high = low >= self.threshold, high >= self.threshold
        else:
            meets_low, meets_high = low <= self.threshold, high <= self.threshold
        if meets_low and meets_high:
            return "pass"
        if not meets_low and not meets_high:
            return "FAIL"
        return "inconclusive"

    def __str__(self) -> str:
        symbol = {">=": "≥", "<=": "≤", "==": "="}[self.op]
        return f"{symbol} {number(self.threshold, self.unit)}"


@dataclass(frozen=True)
class Figure:
    """One row of the report: where its summary is, how to show it, its goal."""

    key: str
    label: str
    unit: str  # "x" (ratio), "%" (fraction shown as percent), "µs", "" (a count)
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
        "callback_hook_fraction/flight_recorder",
        "GradientFlow(flight_recorder=200) at the default cadence (every step recorded, 1 in "
        "50 measured, a check every 50 steps): time in its hooks ÷ VGG38 step time",
        "%",
        Goal("<=", 0.01, "%"),
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
        "transformer/default_cadence",
        "Text Transformer, GradientFlow at the default cadence (1 step in 50 measured): time "
        "in its hooks ÷ step time",
        "%",
        Goal("<=", 0.01, "%"),
    ),
    Figure(
        "transformer/every_step",
        "Text Transformer, GradientFlow measuring every step: time in its hooks ÷ step time",
        "%",
    ),
    Figure(
        "transformer/unmeasured_step_us",
        "Text Transformer, GradientFlow on a step it does not measure: time in its hooks",
        "µs",
    ),
    Figure(
        "transformer/train_step_ratio",
        "Text Transformer training step, Lightning ÷ plain PyTorch (throughput)",
        "x",
    ),
    Figure(
        "collectives_per_logged_step",
        "Collectives per logged step, grad_stats on an FSDP2 model (2 gloo processes)",
        "",
        Goal("==", 1, ""),
    ),
)


def number(value: float | None, unit: str) -> str:
    """``value`` as the report shows it: ``1.23x``, ``0.15%``, ``1``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "%":
        return f"{100 * value:.2f}%"
    if unit == "x":
        return f"{value:,.3g}x" if abs(value) < 100 else f"{value:,.0f}x"
    if unit == "µs":
        return f"{value:,.0f} µs"
    return f"{value:g}"
