"""The flight recorder's figure: the loss around a spike, and every layer's gradient, update and
activation against its own median, step by step (``spike_<step>.png``)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure

from gradtrace.plots.style import figure_style

__all__ = ["plot_spike"]

_LABELS = {
    "activation": "activation RMS",
    "gradient": "gradient L2",
    "update": "update L2",
}
_DECADES = 3.0  # the colour scale's reach either side of a layer's median


def plot_spike(
    steps: Sequence[int],
    losses: Sequence[float],
    layers: Sequence[str],
    values: Mapping[str, Sequence[Sequence[float]]],
    *,
    spike_step: int,
    departure: tuple[int, str, str] | None = None,
    title: str | None = None,
) -> Figure:
    """The loss over ``steps`` with ``spike_step`` marked, above one heatmap per side of
    ``values`` (``{"activation" | "gradient" | "update": [steps x layers]}``, layers in
    data-flow order, input at the top) colouring ``log10(value / the layer's median over the
    steps)``; ``departure`` (``(step, layer, side)``) circles the first value to depart.

    Zeros (nothing measured) are blank; non-finite values are drawn in black.
    """
    import numpy as np
    from matplotlib.figure import Figure

    sides = [side for side in _LABELS if side in values]
    n = len(layers)
    with figure_style():
        fig = Figure(
            figsize=(9.0, 2.0 + len(sides) * max(1.6, 0.12 * n + 0.8)), layout="constrained"
        )
        axes = fig.subplots(
            1 + len(sides), 1, sharex=True, height_ratios=[1.0] + [1.5] * len(sides)
        )
        x = np.arange(len(steps))
        loss_ax = axes[0]
        loss_ax.plot(x, losses, color="black")
        spike_x = list(steps).index(spike_step)
        loss_ax.axvline(
            spike_x, color="tab:red", linestyle="--", label=f"spike (step {spike_step})"
        )
        if departure is not None and departure[0] in steps:
            at = list(steps).index(departure[0])
            label = f"first departure (step {departure[0]})"
            loss_ax.axvline(at, color="black", linestyle=":", label=label)
        loss_ax.set_ylabel("loss")
        loss_ax.legend(loc="upper left")
        cmap = _colour_map()
        for ax, side in zip(axes[1:], sides):
            grid = np.asarray(values[side], dtype=float).T  # layers x steps
            nonfinite = ~np.isfinite(grid)
            with warnings.catch_warnings():  # a layer without values: an all-nan row
                warnings.simplefilter("ignore", RuntimeWarning)
                logs = np.log10(np.where((grid > 0) & ~nonfinite, grid, np.nan))
                median = np.nanmedian(logs, axis=1, keepdims=True)
            relative = np.clip(logs - median, -_DECADES, _DECADES)
            relative[nonfinite] = 2 * _DECADES  # over the scale: drawn black
            image = ax.imshow(
                relative,
                aspect="auto",
                interpolation="nearest",
                cmap=cmap,
                vmin=-_DECADES,
                vmax=_DECADES,
            )
            ax.grid(False)
            ax.axvline(spike_x, color="tab:red", linestyle="--", linewidth=1.0)
            every = max(1, math.ceil(n / 30))
            ax.set_yticks(range(0, n, every))
            ax.set_yticklabels(list(layers)[::every], fontsize=7)
            ax.set_ylabel(_LABELS[side])
            fig.colorbar(image, ax=ax, label="log10(value / median)")
            if departure is not None and departure[2] == side and departure[1] in layers:
                at = (list(steps).index(departure[0]), list(layers).index(departure[1]))
                ax.scatter(
                    *at,
                    s=120,
                    facecolors="none",
                    edgecolors="black",
                    linewidths=1.5,
                    label="first departure",
                )
                ax.legend(loc="upper left")
        ticks = sorted(set(np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int)))
        axes[-1].set_xticks(ticks)
        axes[-1].set_xticklabels([str(steps[t]) for t in ticks])
        axes[-1].set_xlabel("step")
        loss_ax.set_title(title or f"Flight recorder: the loss spiked at step {spike_step}")
    return fig


def _colour_map() -> Colormap:
    """A diverging map (below the median blue, above red); non-finite values black, missing
    ones white."""
    import matplotlib

    return matplotlib.colormaps["RdBu_r"].with_extremes(over="black", bad="white")
