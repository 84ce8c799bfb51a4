"""Gradient-flow figures: what is drawn (values, order, bands, overlays), files and loggers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from gradtrace.plots import (
    layer_summary,
    plot_gradient_flow,
    plot_gradient_heatmap,
    save_figure,
    send_to_loggers,
)

LAYERS = ["stem.weight", "block.weight", "head.weight"]
# step -> mean_abs per layer (input side smallest, as when gradients vanish)
VALUES = {0: [1e-6, 1e-4, 1e-2], 5: [3e-6, 3e-4, 3e-2], 10: [2e-6, 2e-4, 2e-2]}


def history(values: dict[int, list[float]] = VALUES, layers: list[str] = LAYERS) -> list[dict]:
    return [
        {"step": step, "layer": layer, "mean_abs": v, "l2": 10 * v, "nonfinite": 0}
        for step, row in values.items()
        for layer, v in zip(layers, row)
    ]


def test_layer_summary_mean_min_max_and_step_filter() -> None:
    order, mean, low, high = layer_summary(history(), layers=list(reversed(LAYERS)))
    assert order == list(reversed(LAYERS))
    assert mean == pytest.approx([2e-2, 2e-4, 2e-6])
    assert low == pytest.approx([1e-2, 1e-4, 1e-6])
    assert high == pytest.approx([3e-2, 3e-4, 3e-6])
    order, mean, _, _ = layer_summary(history(), stat="l2", steps=[5])
    assert order == LAYERS
    assert mean == pytest.approx([3e-5, 3e-3, 3e-1])


def test_layer_summary_ignores_nonfinite_values() -> None:
    records = history({0: [1.0, math.inf, 2.0], 1: [3.0, 4.0, math.nan]})
    _, mean, _, _ = layer_summary(records)
    assert mean == [2.0, 4.0, 2.0]


def test_gradient_flow_plot_draws_the_averages_in_data_flow_order() -> None:
    fig = plot_gradient_flow(history(), layers=LAYERS, title="t")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    (line,) = ax.lines
    assert list(line.get_xdata()) == [0, 1, 2]
    assert list(line.get_ydata()) == pytest.approx([2e-6, 2e-4, 2e-2])
    assert [t.get_text() for t in ax.get_xticklabels()] == LAYERS  # input on the left
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() == "layer (input \u2192 output)"
    assert ax.get_ylabel() == "mean |grad|"
    assert ax.get_title() == "t"
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1  # min..max over the three steps
    y = bands[0].get_paths()[0].vertices[:, 1]
    assert y.min() == pytest.approx(1e-6)
    assert y.max() == pytest.approx(3e-2)


def test_gradient_flow_plot_from_a_mapping_linear_scale_no_band() -> None:
    fig = plot_gradient_flow({"a": 1.0, "b": 0.5}, log_scale=False)
    ax = fig.axes[0]
    assert ax.get_yscale() == "linear"
    assert list(ax.lines[0].get_ydata()) == [1.0, 0.5]
    assert not ax.collections
    single_step = plot_gradient_flow(history({0: [1.0, 2.0, 3.0]}))
    assert not single_step.axes[0].collections


def test_overlaying_runs_of_different_depth() -> None:
    shallow = history({0: [1e-2, 1e-2]}, layers=["a", "b"])
    deep = history({0: [1e-8, 1e-5, 1e-3, 1e-2, 1e-2]}, layers=list("vwxyz"))
    fig = plot_gradient_flow(shallow, x="depth", label="VGG08")
    plot_gradient_flow(deep, x="depth", ax=fig.axes[0], label="VGG38")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["VGG08", "VGG38"]
    assert list(ax.lines[0].get_xdata()) == [0.0, 1.0]
    assert list(ax.lines[1].get_xdata()) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["VGG08", "VGG38"]
    # same layers overlay fine by name; different ones need x="depth"
    plot_gradient_flow(shallow, ax=(other := plot_gradient_flow(shallow).axes[0]))
    assert len(other.lines) == 2
    with pytest.raises(ValueError, match="use x='depth' to overlay runs of different"):
        plot_gradient_flow(deep, ax=other)


def test_gradient_flow_plot_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="x must be one of layer, depth; got 'step'"):
        plot_gradient_flow(history(), x="step")
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_gradient_flow([])
    with pytest.raises(ValueError, match="records have no 'max_abs'"):
        plot_gradient_flow(history(), stat="max_abs")


def test_zero_gradients_do_not_break_the_log_scale(tmp_path: Path) -> None:
    fig = plot_gradient_flow(history({0: [0.0, 1e-3, 1e-2]}))
    save_figure(fig, tmp_path / "zero.png")
    assert (tmp_path / "zero.png").stat().st_size > 0


def test_heatmap_holds_log10_values_with_blanks() -> None:
    records = history()
    records = [r for r in records if not (r["step"] == 5 and r["layer"] == "block.weight")]
    fig = plot_gradient_heatmap(records, layers=LAYERS, title="h")
    ax = fig.axes[0]
    grid = ax.images[0].get_array()
    expected = np.log10(np.array([VALUES[s] for s in (0, 5, 10)]).T)
    expected[1, 1] = np.nan
    np.testing.assert_allclose(np.ma.filled(grid, np.nan), expected)
    assert [t.get_text() for t in ax.get_yticklabels()] == LAYERS  # input at the top
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "5", "10"]
    assert ax.get_xlabel() == "step"
    assert len(fig.axes) == 2  # the colour bar
    assert fig.axes[1].get_ylabel() == "log10 mean |grad|"
    with pytest.raises(ValueError, match="history is empty"):
        plot_gradient_heatmap([])


def test_save_figure_writes_a_png_and_creates_folders(tmp_path: Path) -> None:
    path = save_figure(plot_gradient_flow(history()), tmp_path / "a" / "b" / "flow.png")
    assert path == tmp_path / "a" / "b" / "flow.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_send_to_loggers_picks_the_ones_that_take_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    fig = plot_gradient_flow(history())
    path = save_figure(fig, tmp_path / "flow.png")
    wandb_logger = WandbLogger.__new__(WandbLogger)  # no W&B run: only log_image is used
    calls = []
    monkeypatch.setattr(wandb_logger, "log_image", lambda **kw: calls.append(kw))
    sent = send_to_loggers([CSVLogger(tmp_path), wandb_logger], "grad_flow/plot", fig, path, 7)
    assert sent == 1
    assert calls == [{"key": "grad_flow/plot", "images": [str(path)], "step": 7}]
