"""The coordinate check's figure: each layer's scale against width, one line per layer.

:func:`plot_coord_check` draws what :func:`gradtrace.measure.coord_check.coord_check`
measured, at one step (the last by default): one panel per statistic (the layer's output,
its change since initialisation, the weight update per entry), each layer's median over the
seeds against width on log-log axes, coloured by relative depth (dark: input layer, yellow:
output layer). A flat line is a layer whose scale does not depend on width; a line rising
with slope 1 grows in proportion to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gradtrace.plots.style import figure_style

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from gradtrace.measure.coord_check import CoordCheckResult

__all__ = ["plot_coord_check"]

_TITLES = {
    "act_rms": "RMS of the layer's output",
    "change_rms": "RMS of its change since initialisation",
    "update_rms": "RMS of the weight update per entry",
}


def plot_coord_check(
    result: CoordCheckResult,
    *,
    stats: Sequence[str] = ("act_rms", "change_rms", "update_rms"),
    step: int | None = None,
    title: str | None = None,
) -> Figure:
    """One panel per statistic in ``stats`` (side by side): each main-path layer's median
    over the seeds at ``step`` (default: the last) against width, log-log, one line per layer
    coloured by relative depth (viridis, with a colour bar), the widths as ticks.

    Raises:
        ValueError: no statistic, an unknown one, or a step that was not recorded.
    """
    if not stats or any(stat not in _TITLES for stat in stats):
        raise ValueError(f"stats must be some of {', '.join(_TITLES)}; got {list(stats)}")
    step = result.steps if step is None else step
    medians = {stat: result.medians(stat, step) for stat in stats}  # checks the step
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    colormap = colormaps["viridis"]
    n = len(result.layers)
    depths = [i / (n - 1) if n > 1 else 0.0 for i in range(n)]
    with figure_style():
        figure = Figure(figsize=(3.6 * len(stats) + 0.8, 3.6), layout="constrained")
        panels = figure.subplots(1, len(stats), squeeze=False)[0]
        for ax, stat in zip(panels, stats):
            for depth, layer in zip(depths, result.layers):
                values = medians[stat][layer]
                if any(math.isfinite(v) and v > 0 for v in values):
                    ax.plot(result.widths, values, marker="o", color=colormap(depth), label=layer)
            # Non-positive values (no change at step 0) are left out rather than failing.
            ax.set_xscale("log")
            ax.set_yscale("log", nonpositive="mask")
            ax.xaxis.set_major_locator(FixedLocator(result.widths))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([str(w) for w in result.widths])
            ax.set_xlabel("width")
            ax.set_title(_TITLES[stat], fontsize=9)
        scale = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colormap)
        figure.colorbar(scale, ax=list(panels), label="relative depth (0 = input, 1 = output)")
        steps = f"{step} step{'' if step == 1 else 's'}"
        figure.suptitle(title or f"Coordinate check after {steps}")
    return figure
