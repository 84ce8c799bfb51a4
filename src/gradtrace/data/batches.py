"""What the data module's ``*_dataloader`` hooks return: seeded, sharded batches cut by index.

Determinism. Every random choice is a pure function of ``seed`` and a position: the training
order of epoch ``e`` of ``(seed, e)``, the crops and flips of global batch ``s`` of epoch ``e``
of ``(seed, e, s)``. Each has its own ``torch.Generator``; the global RNG is never touched. So a
resumed run, or a DDP run, sees exactly the batches and augmentations of one uninterrupted
single-process run.

DDP. With ``W`` processes the global batch is ``batch_size * W``: every rank computes the same
global order and takes slice ``r`` of each global batch (disjoint shards; the union is the
single-process batch of ``batch_size * W``). The last incomplete global training batch is
dropped. Evaluation splits are cut into global batches in order and rank ``r`` takes slice ``r``
of each; the last, partial global batch is shared out as evenly as possible (ranks differ by at
most one image), so every image is evaluated exactly once: no padding, no duplicates.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from gradtrace.data import derive_seed
from gradtrace.data.augmentation import resolve_augment, sample_crops

__all__ = ["EvalBatches", "TrainBatches", "epoch_order", "eval_batch_bounds", "train_batch_indices"]


def epoch_order(num_images: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of ``epoch``: a permutation that depends only on ``(seed, epoch)``."""
    generator = torch.Generator().manual_seed(derive_seed("epoch", seed, epoch))
    return torch.randperm(num_images, generator=generator)


def train_batch_indices(
    order: torch.Tensor, batch_size: int, world_size: int = 1, rank: int = 0
) -> torch.Tensor:
    """``[num_batches, batch_size]`` indices of rank ``rank``'s training batches.

    Global batch ``s`` is ``order[s * G : (s + 1) * G]`` with ``G = batch_size * world_size``;
    rank ``r`` takes its ``r``-th slice of ``batch_size``. The incomplete tail is dropped.
    """
    global_batch = batch_size * world_size
    num_batches = order.numel() // global_batch
    per_step = order[: num_batches * global_batch].view(num_batches, world_size, batch_size)
    return per_step[:, rank]


def eval_batch_bounds(
    num_images: int, batch_size: int, world_size: int = 1, rank: int = 0
) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges of rank ``rank``'s evaluation batches, in order.

    Full global batches of ``batch_size * world_size`` are sliced by rank; the partial last
    one is split into ``world_size`` nearly equal parts. A rank whose part is empty (fewer
    images left than ranks) gets no last batch. Every image appears on exactly one rank.
    """
    global_batch = batch_size * world_size
    full = num_images // global_batch
    bounds = [
        (step * global_batch + rank * batch_size, step * global_batch + (rank + 1) * batch_size)
        for step in range(full)
    ]
    tail_start, tail = full * global_batch, num_images - full * global_batch
    start = tail_start + rank * (tail // world_size) + min(rank, tail % world_size)
    stop = start + tail // world_size + (1 if rank < tail % world_size else 0)
    if stop > start:
        bounds.append((start, stop))
    return bounds


class TrainBatches:
    """One rank's shuffled training batches; iterate once per epoch.

    Yields ``(images uint8 [B, C, H, W], labels int64 [B], crops int64 [B, 3])`` (``crops`` is
    absent when ``augment`` is ``none``; see :func:`~gradtrace.data.augmentation.resolve_augment`).
    The epoch comes from ``trainer.current_epoch`` when a trainer is given, else from
    :meth:`set_epoch`. A plain sized iterable rather than a
    ``DataLoader``: Lightning never injects a sampler into it, nothing is collated per sample,
    and it implements ``state_dict``/``load_state_dict``, so a mid-epoch checkpoint resumes at
    the next unseen batch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        augment: str | bool = "crop_flip",
        padding: int = 4,
        trainer: Any = None,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.seed = batch_size, seed
        self.world_size, self.rank = world_size, rank
        self.augment, self.padding = resolve_augment(augment, "crop_flip"), padding
        self.trainer = trainer
        self.epoch = 0
        self._resume: tuple[int, int] | None = None
        self._iter_epoch, self._yielded = 0, 0

    def __len__(self) -> int:
        return self.labels.numel() // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration plays (ignored when a trainer is attached)."""
        self.epoch = epoch

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else self.epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        epoch, start = self._current_epoch(), 0
        if self._resume is not None:
            (epoch, start), self._resume = self._resume, None
            if start >= len(self):  # the checkpoint was taken at the end of that epoch
                epoch, start = epoch + 1, 0
        self._iter_epoch, self._yielded = epoch, start
        order = epoch_order(self.labels.numel(), self.seed, epoch).to(self.images.device)
        indices = train_batch_indices(order, self.batch_size, self.world_size, self.rank)
        global_batch = self.batch_size * self.world_size
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for step in range(start, indices.shape[0]):
            index = indices[step]
            batch = (self.images[index], self.labels[index])
            if self.augment != "none":
                flip = self.augment == "crop_flip"
                crops = sample_crops(self.seed, epoch, step, global_batch, self.padding, flip)
                batch += (crops[mine],)
            self._yielded = step + 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": e, "batches": k}``: ``k`` batches of epoch ``e`` have been trained on.

        Under a trainer the count is the loop's (its fetcher pre-fetches one batch ahead, so
        the number of batches yielded would overcount by one).
        """
        if self.trainer is not None:
            consumed = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
            return {"epoch": self.trainer.current_epoch, "batches": int(consumed)}
        return {"epoch": self._iter_epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next iteration continue after the batches recorded in ``state``."""
        self._resume = (int(state["epoch"]), int(state["batches"]))


class EvalBatches:
    """One rank's evaluation batches in order: ``(images uint8, labels int64)`` views."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        self.images, self.labels = images, labels
        self.bounds = eval_batch_bounds(labels.numel(), batch_size, world_size, rank)

    def __len__(self) -> int:
        return len(self.bounds)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start, stop in self.bounds:
            yield self.images[start:stop], self.labels[start:stop]
