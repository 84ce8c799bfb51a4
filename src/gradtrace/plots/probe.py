"""The probe's figure: several models' gradient flow on one batch, overlaid by relative depth.

:func:`plot_probe` draws what :func:`gradtrace.measure.probe.probe` measured: per model, the
median over its seeds of each main-path layer's mean ``|grad|`` against relative depth (0 =
input layer, 1 = output layer, so networks of different depth share the axes), with a min-max
band over the seeds, and above it, when activations were measured, the median root mean
square of each layer's output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from gradtrace.plots.style import figure_style, new_axes, new_panels

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from gradtrace.measure.probe import ProbeResult

__all__ = ["plot_probe"]

_DEPTH_LABEL = "relative depth (0 = input layer, 1 = output layer)"


def _depths(n: int) -> list[float]:
    return [i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def _spread(result: ProbeResult, stat: str) -> tuple[list[float], list[float]]:
    """Per main-path layer: the min and max of ``stat`` over the seeds (finite values)."""
    values: dict[str, list[float]] = {name: [] for name in result.layers}
    for record in result.records:
        value = record[stat]
        if record["layer"] in values and math.isfinite(value):
            values[record["layer"]].append(value)
    lows = [min(v) if v else math.nan for v in values.values()]
    highs = [max(v) if v else math.nan for v in values.values()]
    return lows, highs


def _has_activations(results: Mapping[str, ProbeResult]) -> bool:
    return any(
        math.isfinite(record["act_rms"]) for result in results.values() for record in result.records
    )


def _draw(
    ax: Axes,
    results: Mapping[str, ProbeResult],
    stat: str,
    colors: Sequence[str],
    band: bool,
) -> None:
    for (name, result), color in zip(results.items(), colors):
        medians = result.layer_median(stat)
        ys = [medians[layer] for layer in result.layers]
        xs = _depths(len(ys))
        ax.plot(xs, ys, marker="o", color=color, label=name)
        if band and len(result.seeds) > 1:
            lows, highs = _spread(result, stat)
            ax.fill_between(xs, lows, highs, color=color, alpha=0.2, linewidth=0)
    # Non-positive values (an exactly zero gradient) are left out rather than failing.
    ax.set_yscale("log", nonpositive="mask")
    ax.set_xlim(-0.02, 1.02)


def plot_probe(
    results: Mapping[str, ProbeResult],
    *,
    ax: Axes | None = None,
    activations: bool = True,
    title: str | None = None,
) -> Figure:
    """Each result's per-layer median mean |grad| against relative depth (log y), with a
    min-max band over its seeds, one colour per model (``C0``, ``C1``, ... in the order of
    ``results``) and a legend.

    Args:
        results: ``{legend label: ProbeResult}``.
        ax: draw the gradient panel alone into these axes (a panel of your own grid);
            default: a new figure.
        activations: on a new figure, add a panel above, sharing the x axis, with each
            model's median root mean square of every layer's output (log y), when any result
            measured it.
        title: the figure's title (on the top panel; on ``ax`` when given).

    Raises:
        ValueError: no results.
    """
    if not results:
        raise ValueError("nothing to plot: no probe results given")
    colors = [f"C{i % 10}" for i in range(len(results))]
    with figure_style():
        top = None
        if ax is None:
            if activations and _has_activations(results):
                top, ax = new_panels(7.0, 4.5)
            else:
                ax = new_axes(7.0, 4.5)
        _draw(ax, results, "mean_abs", colors, band=True)
        ax.set_xlabel(_DEPTH_LABEL)
        ax.set_ylabel("mean |grad| of the weights")
        ax.legend(fontsize=7)
        if top is not None:
            _draw(top, results, "act_rms", colors, band=False)
            top.set_ylabel("RMS of the layer's output")
        if title is not None:
            (top if top is not None else ax).set_title(title)
    return ax.figure
