"""Gradient histograms sent to the loggers that take them (TensorBoard, W&B), from
:func:`gradtrace.measure.histograms.gradient_histograms`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gradtrace.measure.histograms import gradient_histograms
from gradtrace.measure.shards import FSDP1Groups

__all__ = ["send_histograms"]


def send_histograms(
    loggers: Sequence[Any],
    named_parameters: Sequence[tuple[str, torch.Tensor]],
    step: int,
    *,
    write: bool = True,
    fsdp1_groups: FSDP1Groups | None = None,
) -> int:
    """Send ``grad_flow/histogram/<name>`` to the TensorBoard and W&B loggers among
    ``loggers``; return how many took them. Computes nothing when none takes histograms.

    Every rank calls it with the same loggers (Lightning builds them on every rank): ranks
    holding shards take part in the collectives; only the one with ``write`` logs.
    """
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    takers = [lg for lg in loggers if isinstance(lg, (TensorBoardLogger, WandbLogger))]
    if not takers:
        return 0
    histograms = gradient_histograms(named_parameters, fsdp1_groups=fsdp1_groups)
    if not write:
        return 0
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
