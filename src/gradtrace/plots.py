"""Gradient-flow figures (the report's Figure 2 style plot, a layer x step heatmap) and
training curves (loss and accuracy of several runs, the report's Figure 1 style).

Every function takes the records of :attr:`gradtrace.GradientFlow.history` (or
:func:`gradtrace.gradient_flow.read_history` of a CSV) and returns a matplotlib ``Figure``.
Figures are built with the object-oriented API (no pyplot, no GUI backend, nothing global),
rendered by Agg when saved. matplotlib is imported inside the functions, so importing this
module costs nothing; it is an optional dependency (``pip install 'gradtrace[plot]'``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "layer_summary",
    "plot_gradient_flow",
    "plot_gradient_heatmap",
    "plot_training_curves",
    "save_figure",
    "send_to_loggers",
]

STAT_LABELS = {
    "mean_abs": "mean |grad|",
    "l2": "||grad||_2",
    "max_abs": "max |grad|",
    "nonfinite": "non-finite entries",
    "update_ratio": "||dw|| / ||w||",
}
X_MODES = ("layer", "depth")

# One look for every gradtrace figure.
_STYLE = {
    "font.size": 9,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linestyle": "-",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "lines.linewidth": 1.5,
    "lines.markersize": 3.5,
    "savefig.bbox": "tight",
}


def _rc() -> Any:
    import matplotlib

    return matplotlib.rc_context(_STYLE)


def _new_axes(width: float, height: float) -> Axes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig.add_subplot()


def layer_summary(
    history: Iterable[Mapping[str, Any]],
    stat: str = "mean_abs",
    layers: Sequence[str] | None = None,
    steps: Iterable[int] | None = None,
) -> tuple[list[str], list[float], list[float], list[float]]:
    """Per layer: the mean, min and max of ``stat`` over the records' steps.

    Returns ``(layers, mean, low, high)``. Layers are ``layers`` when given (those without
    records are dropped), else in order of first appearance. Non-finite values are ignored.
    """
    wanted = set(steps) if steps is not None else None
    values: dict[str, list[float]] = {}
    for record in history:
        if wanted is not None and record["step"] not in wanted:
            continue
        if stat not in record:
            raise ValueError(f"records have no {stat!r}; they have {', '.join(record)}")
        value = float(record[stat])
        bucket = values.setdefault(record["layer"], [])
        if math.isfinite(value):
            bucket.append(value)
    order = [name for name in layers if name in values] if layers is not None else list(values)
    means, lows, highs = [], [], []
    for name in order:
        v = values[name]
        means.append(sum(v) / len(v) if v else math.nan)
        lows.append(min(v) if v else math.nan)
        highs.append(max(v) if v else math.nan)
    return order, means, lows, highs


def plot_gradient_flow(
    data: Iterable[Mapping[str, Any]] | Mapping[str, float],
    *,
    stat: str = "mean_abs",
    layers: Sequence[str] | None = None,
    steps: Iterable[int] | None = None,
    x: str = "layer",
    ax: Axes | None = None,
    log_scale: bool = True,
    band: bool = True,
    title: str | None = None,
    label: str | None = None,
) -> Figure:
    """Figure-2-style gradient flow: ``stat`` per layer, input on the left.

    Args:
        data: history records (``{"step", "layer", stat, ...}``; values are averaged over
            the steps, optionally restricted to ``steps``), or a ``{layer: value}`` mapping.
        layers: the x order (data-flow order); default: order of first appearance.
        x: ``"layer"`` puts one named tick per layer; ``"depth"`` puts layers at relative
            depth 0 (input) .. 1 (output), so runs of different depth can share one axes.
        ax: draw into these axes (overlay several runs by passing the same ``ax`` and a
            ``label`` each); default: a new figure.
        log_scale: logarithmic y axis (non-positive values are not drawn).
        band: shade min..max over the steps when the records span several steps.
        title, label: axes title and legend label of this run.
    """
    if x not in X_MODES:
        raise ValueError(f"x must be one of {', '.join(X_MODES)}; got {x!r}")
    if isinstance(data, Mapping):
        order = [name for name in layers if name in data] if layers is not None else list(data)
        means = [float(data[name]) for name in order]
        lows = highs = means
        band = False
    else:
        records = list(data)
        order, means, lows, highs = layer_summary(records, stat, layers, steps)
        band = band and len({r["step"] for r in records}) > 1
    if not order:
        raise ValueError("nothing to plot: no layer has a value")
    n = len(order)
    with _rc():
        if ax is None:
            ax = _new_axes(max(6.0, 0.22 * n + 2.0) if x == "layer" else 7.0, 4.5)
        if x == "layer":
            previous = getattr(ax, "_gradtrace_layers", None)
            if previous is not None and previous != order:
                raise ValueError(
                    "these axes already show a run with other layers; use x='depth' to "
                    "overlay runs of different architectures"
                )
            ax._gradtrace_layers = order  # type: ignore[attr-defined]
            xs = list(range(n))
        else:
            xs = [i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        (line,) = ax.plot(xs, means, marker="o", label=label)
        if band:
            ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
        if log_scale:
            ax.set_yscale("log", nonpositive="mask")
        if x == "layer":
            ax.set_xticks(xs)
            ax.set_xticklabels(order, rotation=90, fontsize=7 if n > 30 else 8)
            ax.set_xlim(-0.5, n - 0.5)
            ax.set_xlabel("layer (input \u2192 output)")
        else:
            ax.set_xlim(-0.02, 1.02)
            ax.set_xlabel("relative depth (0 = input layer, 1 = output layer)")
        ax.set_ylabel(STAT_LABELS.get(stat, stat))
        if title is not None:
            ax.set_title(title)
        if label is not None:
            ax.legend()
    return ax.figure


def plot_gradient_heatmap(
    history: Iterable[Mapping[str, Any]],
    *,
    stat: str = "mean_abs",
    layers: Sequence[str] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Layer x step heatmap of ``log10(stat)``; input layer on top, steps left to right.

    Missing, zero and non-finite values are left blank.
    """
    import numpy as np

    records = list(history)
    if not records:
        raise ValueError("nothing to plot: the history is empty")
    steps = sorted({r["step"] for r in records})
    seen = list(dict.fromkeys(r["layer"] for r in records))
    order = [name for name in layers if name in set(seen)] if layers is not None else seen
    row = {name: i for i, name in enumerate(order)}
    col = {step: j for j, step in enumerate(steps)}
    grid = np.full((len(order), len(steps)), np.nan)
    for r in records:
        if r["layer"] not in row:
            continue
        if stat not in r:
            raise ValueError(f"records have no {stat!r}; they have {', '.join(r)}")
        value = float(r[stat])
        if value > 0 and math.isfinite(value):
            grid[row[r["layer"]], col[r["step"]]] = math.log10(value)
    n = len(order)
    with _rc():
        if ax is None:
            ax = _new_axes(8.0, max(3.0, 0.16 * n + 1.5))
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.grid(False)
        ax.figure.colorbar(image, ax=ax, label=f"log10 {STAT_LABELS.get(stat, stat)}")
        every = max(1, math.ceil(n / 60))
        ax.set_yticks(range(0, n, every))
        ax.set_yticklabels(order[::every], fontsize=7 if n > 30 else 8)
        ticks = sorted(set(np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)))
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(steps[t]) for t in ticks])
        ax.set_xlabel("step")
        ax.set_ylabel("layer (input at the top)")
        if title is not None:
            ax.set_title(title)
    return ax.figure


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
    with _rc():
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


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 150) -> Path:
    """Save ``fig`` as an image at ``path`` (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _rc():
        fig.savefig(path, dpi=dpi)
    return path


def send_to_loggers(loggers: Iterable[Any], key: str, fig: Figure, path: Path, step: int) -> int:
    """Send a saved figure to the loggers that take images; return how many took it.

    W&B gets the PNG at ``path`` (``WandbLogger.log_image``), TensorBoard the figure
    (``SummaryWriter.add_figure``). Other loggers are left alone.
    """
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    sent = 0
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=step)
            sent += 1
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(key, fig, global_step=step, close=False)
            sent += 1
    return sent
