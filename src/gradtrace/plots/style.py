"""One look for every gradtrace figure, and where figures go: files and loggers.

Figures are built with matplotlib's object-oriented API (no pyplot, no GUI backend, nothing
global) and rendered by Agg when saved; matplotlib is imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["figure_style", "new_axes", "new_panels", "save_figure", "send_to_loggers"]

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


def figure_style() -> Any:
    """A context in which matplotlib draws in gradtrace's style."""
    import matplotlib

    return matplotlib.rc_context(_STYLE)


def new_axes(width: float, height: float) -> Axes:
    """One axes on a new figure of ``width`` x ``height`` inches."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig.add_subplot()


def new_panels(width: float, height: float) -> tuple[Axes, Axes]:
    """An activation panel above a gradient panel, sharing the x axis."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height + 2.2), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(1.0, 2.0))
    return top, bottom


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 150) -> Path:
    """Save ``fig`` as an image at ``path`` (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with figure_style():
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
