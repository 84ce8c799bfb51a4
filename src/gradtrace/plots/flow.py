"""Gradient-flow figures: the report's Figure 2 style plot (with, when activations were
recorded, an activation panel above it on the same x axis), several runs overlaid by relative
depth, and a layer x step heatmap.

Every function takes the records of :attr:`gradtrace.GradientFlow.history` (or
:func:`gradtrace.measure.read_history` of a CSV) and returns a matplotlib ``Figure``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

from gradtrace.checks import check_choice
from gradtrace.plots.style import figure_style, new_axes, new_panels

__all__ = [
    "STAT_LABELS",
    "X_MODES",
    "has_activation_stats",
    "layer_summary",
    "plot_activation_flow",
    "plot_gradient_flow",
    "plot_gradient_heatmap",
    "plot_runs",
]

STAT_LABELS = {
    "mean_abs": "mean |grad|",
    "l2": "||grad||_2",
    "max_abs": "max |grad|",
    "nonfinite": "non-finite entries",
    "update_ratio": "||dw|| / ||w||",
    "act_grad_mean_abs": "mean |dL/d output|",
}
X_MODES = ("layer", "depth")
# The activation panel: (statistic, legend text, line style).
_ACTIVATION_PANEL = (
    ("act_zero_frac", "exact zeros (dead units)", "zeros", "-"),
    ("act_sat_frac", "saturated (within 1% of the bounds)", "saturated", ":"),
)


def _positions(order: Sequence[str], x: str) -> dict[str, float]:
    """x of every layer: its index (``"layer"``) or relative depth 0..1 (``"depth"``)."""
    n = len(order)
    if x == "layer":
        return {name: float(i) for i, name in enumerate(order)}
    return {name: i / (n - 1) if n > 1 else 0.0 for i, name in enumerate(order)}


def has_activation_stats(history: Iterable[Mapping[str, Any]]) -> bool:
    """Whether any record holds a finite ``act_zero_frac`` (activations were recorded)."""
    return any(
        isinstance(r.get("act_zero_frac"), (int, float)) and math.isfinite(r["act_zero_frac"])
        for r in history
    )


def _summary_of(
    records: Sequence[Mapping[str, Any]], stat: str, steps: Iterable[int] | None
) -> dict[str, float]:
    """``{layer: mean of stat over the steps}`` for layers with a finite value of ``stat``."""
    order, means, _, _ = layer_summary([r for r in records if stat in r], stat, steps=steps)
    return {name: m for name, m in zip(order, means) if math.isfinite(m)}


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
    activations: bool | None = None,
    color: str | None = None,
) -> Figure:
    """Figure-2-style gradient flow: ``stat`` per layer, input on the left.

    When the records hold activation statistics (``GradientFlow(activations=True)``), a new
    figure gets an activation panel above the gradients, on the same x axis (see
    :func:`plot_activation_flow`): a dead or saturated layer sits right above the point where
    the gradient falls. With ``stat="mean_abs"`` the gradient panel also shows ``mean |dL/d
    output|`` of each layer (dashed), the factor the report's equation 2 multiplies.

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
        activations: draw the activation panel (new figures only); ``None``: when recorded.
        color: this run's colour (default: the axes' next one).
    """
    check_choice("x", x, X_MODES)
    records: list[Mapping[str, Any]] = []
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
    if activations is None:
        activations = has_activation_stats(records)
    with figure_style():
        if ax is None:
            width = max(6.0, 0.22 * n + 2.0) if x == "layer" else 7.0
            if activations:
                top, ax = new_panels(width, 4.5)
                plot_activation_flow(
                    records, layers=order, steps=steps, x=x, ax=top, label=label, color=color
                )
                if title is not None:
                    top.set_title(title)
                    title = None
            else:
                ax = new_axes(width, 4.5)
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
        (line,) = ax.plot(xs, means, marker="o", label=label, color=color)
        if band:
            ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
        output_grads = (
            _summary_of(records, "act_grad_mean_abs", steps) if stat == "mean_abs" else {}
        )
        if output_grads:
            at = _positions(order, x)
            shown = [name for name in order if name in output_grads]
            ax.plot(
                [at[name] for name in shown],
                [output_grads[name] for name in shown],
                linestyle="--",
                marker=".",
                color=line.get_color(),
                label=f"{label}: dL/d output" if label else "mean |dL/d output|",
            )
            if label is None:
                line.set_label("mean |grad| of the weights")
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
        if label is not None or output_grads:
            ax.legend(fontsize=7)
    return ax.figure


def plot_activation_flow(
    history: Iterable[Mapping[str, Any]],
    *,
    layers: Sequence[str] | None = None,
    steps: Iterable[int] | None = None,
    x: str = "layer",
    ax: Axes | None = None,
    title: str | None = None,
    label: str | None = None,
    color: str | None = None,
) -> Figure:
    """The activation panel: per layer, the fraction of outputs that are exact zeros (dead
    units, solid) and that are saturated (dotted; only layers followed by a sigmoid, tanh or
    hardtanh), averaged over the steps, input on the left.

    Args:
        history: records with ``act_zero_frac`` / ``act_sat_frac`` (others are skipped).
        layers: the x order; layers without activation values keep their place (so this panel
            lines up with :func:`plot_gradient_flow`'s on the same ``layers``).
        x, ax, title: as in :func:`plot_gradient_flow`.
        label, color: this run's legend label and colour (several runs on one axes).
    """
    check_choice("x", x, X_MODES)
    records = list(history)
    order = list(layers) if layers is not None else list(dict.fromkeys(r["layer"] for r in records))
    at = _positions(order, x)
    panel = [
        (stat, text, short, style, _summary_of(records, stat, steps))
        for stat, text, short, style in _ACTIVATION_PANEL
    ]
    if not any(values for *_, values in panel):
        raise ValueError("nothing to plot: the records hold no activation statistics")
    with figure_style():
        if ax is None:
            ax = new_axes(max(6.0, 0.22 * len(order) + 2.0) if x == "layer" else 7.0, 3.0)
        colors = (
            {"act_zero_frac": "C3", "act_sat_frac": "C1"} if color is None and label is None else {}
        )
        for stat, text, short, style, values in panel:
            shown = [name for name in order if name in values]
            if not shown:
                continue
            (line,) = ax.plot(
                [at[name] for name in shown],
                [values[name] for name in shown],
                linestyle=style,
                marker="o" if style == "-" else "^",
                color=colors.get(stat, color),
                label=f"{label}: {short}" if label else text,
            )
            color = color or line.get_color()  # one colour per run
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("fraction of outputs")
        if x == "layer" and ax.get_xlabel() == "":
            ax.set_xticks([at[name] for name in order])
            ax.set_xticklabels(order, rotation=90, fontsize=7 if len(order) > 30 else 8)
        ax.legend(fontsize=7)
        if title is not None:
            ax.set_title(title)
    return ax.figure


def plot_runs(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    stat: str = "mean_abs",
    last_n_steps: int | None = 5,
    log_scale: bool = True,
    title: str | None = None,
) -> Figure:
    """Several runs' gradient flow overlaid by relative depth (0 = input layer, 1 = output),
    with the activation panel above when any run recorded activations.

    Args:
        runs: ``{legend label: history records}``; each run's layers are in data-flow order
            (order of first appearance, as ``GradientFlow`` writes them).
        last_n_steps: average each run over its last this many logged steps (``None``: all).
    """
    if not runs:
        raise ValueError("nothing to plot: no runs given")
    with_activations = any(has_activation_stats(records) for records in runs.values())
    with figure_style():
        if with_activations:
            top, bottom = new_panels(8.0, 4.5)
        else:
            top, bottom = None, new_axes(8.0, 4.5)
        for index, (label, records) in enumerate(runs.items()):
            logged = sorted({r["step"] for r in records})
            steps = logged[-last_n_steps:] if last_n_steps is not None else None
            color = f"C{index % 10}"
            plot_gradient_flow(
                records,
                stat=stat,
                steps=steps,
                x="depth",
                ax=bottom,
                log_scale=log_scale,
                label=label,
                color=color,
            )
            if top is not None and has_activation_stats(records):
                order = list(dict.fromkeys(r["layer"] for r in records))
                plot_activation_flow(
                    records, layers=order, steps=steps, x="depth", ax=top, label=label, color=color
                )
        _key_legends(top, bottom, runs)
        if title is not None:
            bottom.figure.suptitle(title)
    return bottom.figure


def _key_legends(top: Axes | None, bottom: Axes, runs: Mapping[str, Any]) -> None:
    """One legend entry per run (its colour) and one per line style, instead of one per line."""
    from matplotlib.lines import Line2D

    def key(style: str, text: str) -> Line2D:
        return Line2D([], [], color="0.4", linestyle=style, label=text)

    handles = [Line2D([], [], color=f"C{i % 10}", label=label) for i, label in enumerate(runs)]
    if any(line.get_linestyle() == "--" for line in bottom.lines):
        handles += [
            key("-", "weights: mean |grad|"),
            key("--", "layer outputs: mean |dL/d output|"),
        ]
    bottom.legend(handles=handles, fontsize=7)
    if top is not None:
        top.legend(
            handles=[key(style, text) for _, text, _, style in _ACTIVATION_PANEL], fontsize=7
        )


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
    with figure_style():
        if ax is None:
            ax = new_axes(8.0, max(3.0, 0.16 * n + 1.5))
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
