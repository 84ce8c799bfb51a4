"""Gradient histograms for TensorBoard (``add_histogram_raw``) and W&B (``wandb.Histogram``).

Counted on the device with ``torch.histc`` (non-finite entries left out); two small
device-to-host copies per histogram step (the ranges, then the counts).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = ["BINS", "gradient_histograms", "send_histograms"]

BINS = 64


def gradient_histograms(
    grads: Sequence[tuple[str, torch.Tensor]], bins: int = BINS
) -> dict[str, dict[str, Any]]:
    """``{name: {"edges", "counts", "sum", "sum_squares", "num", "min", "max"}}`` (host lists
    and floats) of each gradient's finite entries; gradients with none are left out."""
    stats = []
    for _, grad in grads:
        g = grad.detach().float().flatten()
        finite = torch.isfinite(g)
        clean = torch.where(finite, g, 0.0)
        stats.append(
            torch.stack(
                [
                    torch.where(finite, g, torch.inf).min(),
                    torch.where(finite, g, -torch.inf).max(),
                    finite.sum().float(),
                    clean.sum(),
                    clean.square().sum(),
                ]
            )
        )
    if not stats:
        return {}
    ranges = torch.stack([s.to(stats[0].device) for s in stats]).cpu().tolist()
    out: dict[str, dict[str, Any]] = {}
    counts = []
    for (name, grad), (low, high, num, total, squares) in zip(grads, ranges):
        if num == 0:
            continue
        if low == high:
            low, high = low - 0.5, high + 0.5
        g = grad.detach().float().flatten()
        counts.append(torch.histc(torch.where(torch.isfinite(g), g, low - 1.0), bins, low, high))
        step = (high - low) / bins
        out[name] = {
            "edges": [low + k * step for k in range(bins + 1)],
            "sum": total,
            "sum_squares": squares,
            "num": num,
            "min": low,
            "max": high,
        }
    for name, count in zip(out, torch.stack(counts).cpu().tolist() if counts else []):
        out[name]["counts"] = count
    return out


def send_histograms(
    loggers: Iterable[Any], grads: Sequence[tuple[str, torch.Tensor]], step: int
) -> int:
    """Send ``grad_flow/histogram/<name>`` to TensorBoard and W&B loggers; return how many
    loggers took them. Computes nothing when no logger takes histograms."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    takers = [lg for lg in loggers if isinstance(lg, (TensorBoardLogger, WandbLogger))]
    if not takers:
        return 0
    histograms = gradient_histograms(grads)
    for logger in takers:
        if isinstance(logger, TensorBoardLogger):
            for name, h in histograms.items():
                logger.experiment.add_histogram_raw(
                    f"grad_flow/histogram/{name}",
                    min=h["min"],
                    max=h["max"],
                    num=h["num"],
                    sum=h["sum"],
                    sum_squares=h["sum_squares"],
                    bucket_limits=h["edges"][1:],
                    bucket_counts=h["counts"],
                    global_step=step,
                )
        else:
            import wandb

            logger.log_metrics(
                {
                    f"grad_flow/histogram/{name}": wandb.Histogram(
                        np_histogram=(h["counts"], h["edges"])
                    )
                    for name, h in histograms.items()
                },
                step=step,
            )
    return len(takers)
