"""What the bench times gradtrace against: a plain PyTorch loop.

The baseline is what a researcher would write by hand, doing the same work as gradtrace:
the same network from :func:`gradtrace.models.create_model`, the same uint8 tensors, the same
augmentation functions (:func:`~gradtrace.data.augmentation.crop_flip`,
:func:`~gradtrace.data.augmentation.normalize`), Adam with the same cosine schedule, batch 100.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from gradtrace.data.augmentation import crop_flip, normalize, sample_crops
from gradtrace.data.batches import epoch_order
from gradtrace.models import create_model

__all__ = ["PlainLoop"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainLoop:
    """A minimal hand-written training loop; :meth:`run` trains ``steps`` batches.

    Per step: cut a batch by index from the uint8 tensors, crop + flip + normalise it with
    gradtrace's functions, cast to channels_last, forward under autocast when ``precision``
    is ``bf16-mixed``, cross-entropy, ``zero_grad``, backward, Adam step, cosine schedule step.

    Args:
        arch, model_options: the network (``create_model(arch, num_classes, **model_options)``).
        images, labels, mean, std: the training split and its normalisation.
        batch_size, padding, seed: batches, crop padding, order and crops as the data module.
        device: where to train (the tensors are moved there once).
        precision: ``32-true`` or ``bf16-mixed``.
        compile: ``torch.compile`` the network in place, as ``ImageClassifier(compile=True)``.
        lr, total_steps: Adam's learning rate and the cosine schedule's length.
    """

    def __init__(
        self,
        arch: str,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        *,
        num_classes: int = 100,
        model_options: dict[str, Any] | None = None,
        batch_size: int = 100,
        padding: int = 4,
        seed: int = 0,
        device: torch.device | str = "cpu",
        precision: str = "32-true",
        compile: bool = False,
        lr: float = 1e-3,
        total_steps: int = 1000,
    ) -> None:
        if precision not in ("32-true", "bf16-mixed"):
            raise ValueError(f"precision must be one of 32-true, bf16-mixed; got {precision!r}")
        self.device = torch.device(device)
        self.net = create_model(arch, num_classes=num_classes, **(model_options or {}))
        self.net = self.net.to(self.device, memory_format=torch.channels_last)
        if compile:
            self.net.compile()
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, total_steps)
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.mean, self.std = mean.to(self.device), std.to(self.device)
        self.batch_size, self.padding, self.seed = batch_size, padding, seed
        self.autocast = precision == "bf16-mixed"
        self._batches = self._batch_indices()

    def _batch_indices(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        epoch = 0
        n = self.labels.numel()
        while True:
            order = epoch_order(n, self.seed, epoch).to(self.device)
            for step in range(n // self.batch_size):
                yield epoch, step, order[step * self.batch_size : (step + 1) * self.batch_size]
            epoch += 1

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next augmented, normalised batch ``(x float32 channels_last, y int64)``."""
        epoch, step, index = next(self._batches)
        crops = sample_crops(self.seed, epoch, step, self.batch_size, self.padding)
        crops = crops.to(self.device, non_blocking=True)
        images = crop_flip(self.images[index], crops, self.padding)
        x = normalize(images, self.mean, self.std).contiguous(memory_format=torch.channels_last)
        return x, self.labels[index]

    def step(self) -> torch.Tensor:
        """One training step; returns the loss (on the device, not read back)."""
        x, y = self.next_batch()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = F.cross_entropy(self.net(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def run(self, steps: int = 1) -> float:
        """Train ``steps`` batches; return the wall time (the device synchronised at the end)."""
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        _sync(self.device)
        return time.perf_counter() - start
