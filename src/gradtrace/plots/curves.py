"""Training curves: loss and accuracy of several runs (the report's Figure 1 style)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from gradtrace.plots.style import figure_style

__all__ = ["plot_training_curves"]


def plot_training_curves(
    runs: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    *,
    xlabel: str = "optimizer step",
    chance: float | None = None,
    title: str | None = None,
) -> Figure:
    """Loss (left) and accuracy (right, in %) curves of one or more runs.

    Args:
        runs: ``{run label: {series: [(x, y), ...]}}`` with series named ``train/loss``,
            ``val/loss``, ``train/acc``, ``val/acc`` (accuracies as fractions in [0, 1]);
            missing or empty series are skipped. Each run keeps one colour; training
            series are solid lines, validation series dashed with markers.
        xlabel: what x counts (``"optimizer step"``, ``"epoch"``).
        chance: the chance accuracy (``1 / classes``): drawn as a dotted line on the
            accuracy panel and as ``ln(classes)`` on the loss panel.
        title: the figure's title.
    """
    if not any(points for series in runs.values() for points in series.values()):
        raise ValueError("nothing to plot: every run's series are empty")
    if chance is not None and not 0.0 < chance < 1.0:
        raise ValueError(f"chance must be an accuracy in (0, 1); got {chance!r}")
    from matplotlib.figure import Figure

    panels = (("loss", "cross-entropy loss", 1.0), ("acc", "accuracy (%)", 100.0))
    with figure_style():
        fig = Figure(figsize=(10.0, 4.0), layout="constrained")
        axes = fig.subplots(1, 2)
        for index, label in enumerate(runs):
            color = f"C{index % 10}"
            for ax, (metric, _, scale) in zip(axes, panels):
                for split, style in (
                    ("train", {"linestyle": "-"}),
                    ("val", {"linestyle": "--", "marker": "o"}),
                ):
                    points = sorted(runs[label].get(f"{split}/{metric}") or [])
                    if not points:
                        continue
                    if len(points) <= 20:  # sparse series (per epoch): show the points
                        style = {"marker": "o", **style}
                    ax.plot(
                        [x for x, _ in points],
                        [scale * y for _, y in points],
                        color=color,
                        label=f"{label}, {'training' if split == 'train' else 'validation'}",
                        **style,
                    )
        for ax, (metric, ylabel, _) in zip(axes, panels):
            if chance is not None:
                level = math.log(1.0 / chance) if metric == "loss" else 100.0 * chance
                ax.axhline(level, color="0.5", linestyle=":", linewidth=1.0, label="chance")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7)
        if title is not None:
            fig.suptitle(title)
    return fig
