"""The callback's figures: a gradient-flow plot per epoch and a layer x step heatmap at the end,
saved as PNGs in the run directory and sent to W&B and TensorBoard. Needs matplotlib."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

__all__ = ["draw_figure", "matplotlib_missing"]


def matplotlib_missing() -> str | None:
    """Why figures cannot be drawn (matplotlib not importable), or ``None``."""
    try:
        import matplotlib  # noqa: F401  (optional: the "plot" extra)
    except ImportError as err:
        return str(err)
    return None


def draw_figure(
    trainer: pl.Trainer,
    kind: str,
    records: list[dict[str, Any]],
    order: list[str],
    path: Path,
    step: int,
    log_scale: bool = True,
) -> Path:
    """Draw ``kind`` (``"flow"`` or ``"heatmap"``) of ``records`` with layers in ``order``, save
    it to ``path`` and send it to the trainer's W&B/TensorBoard loggers at ``step``."""
    from gradtrace import plots

    if kind == "flow":
        title = f"Gradient flow, epoch {trainer.current_epoch}"
        fig = plots.plot_gradient_flow(records, layers=order, log_scale=log_scale, title=title)
        key = "grad_flow/plot"
    else:
        fig = plots.plot_gradient_heatmap(records, layers=order, title="Gradient flow")
        key = "grad_flow/heatmap"
    saved = plots.save_figure(fig, path)
    plots.send_to_loggers(trainer.loggers, key, fig, saved, step=step)
    return saved
