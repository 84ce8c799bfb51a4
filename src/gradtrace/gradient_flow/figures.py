"""The callback's figures: a gradient-flow plot per epoch and a layer x step heatmap at the end,
saved as PNGs in the run directory and sent to W&B and TensorBoard. Needs matplotlib."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from gradtrace.gradient_flow.cadence import logging_step
from gradtrace.measure.faults import Faults

__all__ = ["FitFigures", "draw_figure", "matplotlib_missing"]


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


class FitFigures:
    """Draws one fit's figures when ``enabled``, each guarded by ``faults`` (feature
    ``plots``), with layers sorted by ``layer_rank``; without matplotlib, says so in one info
    line and draws none."""

    def __init__(
        self, faults: Faults, enabled: bool, log_scale: bool, layer_rank: Callable[[str], Any]
    ) -> None:
        self._faults = faults
        self._enabled = enabled
        self._log_scale = log_scale
        self._layer_rank = layer_rank
        self._matplotlib_missing = False

    def draw(
        self,
        trainer: pl.Trainer,
        kind: str,
        records: list[dict[str, Any]],
        csv_path: Path | None,
        stem: str,
    ) -> None:
        """Draw ``kind`` (see :func:`draw_figure`) of ``records``, if any, at the current
        logging step into ``<CSV's folder>/<CSV's stem>/<stem>.png``."""
        if not records or not self._enabled or csv_path is None:
            return
        if self._matplotlib_missing or not self._faults.active("plots"):
            return
        missing = matplotlib_missing()
        if missing is not None:
            self._matplotlib_missing = True
            rank_zero_info(
                f"GradientFlow: no gradient-flow plots ({missing}); install matplotlib "
                "(pip install 'gradtrace[plot]') to get them. The CSV and logger metrics are "
                "unaffected."
            )
            return
        order = sorted({r["layer"] for r in records}, key=self._layer_rank)
        path = csv_path.parent / csv_path.stem / f"{stem}.png"
        step = logging_step(trainer)
        self._faults.run(
            "plots", draw_figure, trainer, kind, records, order, path, step, self._log_scale
        )
