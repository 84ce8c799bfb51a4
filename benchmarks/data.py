"""The data pipeline: ImageDataModule's batches vs torchvision's per-sample DataLoader.

:class:`OurBatches` is exactly what a training step gets from gradtrace;
:class:`TorchvisionBatches` the usual torchvision recipe, doing the same augmentation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from benchmarks.config import BenchConfig, Log
from benchmarks.stats import Summary, interleave, ratios
from gradtrace.datamodule import ImageDataModule, TrainBatches

__all__ = ["OurBatches", "TorchvisionBatches", "bench_data"]

# Seconds for DataLoader workers to fill their prefetch queue (2 workers x 2 batches).
PREFETCH_SETTLE_S = 0.5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OurBatches:
    """ImageDataModule's training batches, augmented, ``n`` per :meth:`run`, epoch after epoch.

    Exactly what a training step gets: :class:`~gradtrace.datamodule.TrainBatches` over the
    module's uint8 split (on ``device``), then ``dm.transform_batch`` (crop + flip + normalise).
    """

    def __init__(self, dm: ImageDataModule, device: torch.device | str = "cpu") -> None:
        self.dm = dm
        self.device = torch.device(device)
        images, labels = dm.split("train")
        self.loader = TrainBatches(
            images.to(self.device),
            labels.to(self.device),
            dm.batch_size,
            seed=dm.seed,
            augment=dm.augment,
            padding=dm.crop_padding,
        )
        self._batches = self._forever()

    def _forever(self) -> Iterator[tuple[torch.Tensor, ...]]:
        epoch = 0
        while True:
            self.loader.set_epoch(epoch)
            for batch in self.loader:
                crops = (batch[2].to(self.device, non_blocking=True),) if len(batch) == 3 else ()
                yield (batch[0], batch[1], *crops)
            epoch += 1

    def run(self, batches: int) -> float:
        """Produce ``batches`` augmented batches; return the wall time."""
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(batches):
            self.dm.transform_batch(next(self._batches))
        _sync(self.device)
        return time.perf_counter() - start


class _PerSampleImages(torch.utils.data.Dataset):
    """What ``torchvision.datasets.CIFAR100`` does per item: HWC uint8 -> PIL -> transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Any) -> None:
        self.images = images.cpu().permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = labels.cpu().tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


class TorchvisionBatches:
    """The usual torchvision recipe: per-sample transforms in a ``DataLoader`` with workers.

    ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` on
    PIL images, ``num_workers`` worker processes, shuffled, batch 100, then (on CUDA) a
    pinned, non-blocking copy to the device. Timed in steady state: the workers start, and
    ``warmup`` batches are drawn, before any timing.

    It can draw at most one epoch (``len(self)`` batches) in all, warm-up included, so that
    no epoch restart lands inside a timing.
    """

    def __init__(
        self,
        dm: ImageDataModule,
        *,
        workers: int = 2,
        device: torch.device | str = "cpu",
        warmup: int = 4,
    ) -> None:
        from torch.utils.data import DataLoader
        from torchvision import transforms

        self.device = torch.device(device)
        images, labels = dm.split("train")
        height, width = images.shape[-2:]
        transform = transforms.Compose(
            [
                transforms.RandomCrop((height, width), padding=dm.crop_padding),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(dm.mean.tolist(), dm.std.tolist()),
            ]
        )
        self.loader = DataLoader(
            _PerSampleImages(images, labels, transform),
            batch_size=dm.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(0),
        )
        self._iterator = iter(self.loader)
        self.drawn = 0
        self.run(warmup)

    def __len__(self) -> int:
        return len(self.loader)

    def run(self, batches: int) -> float:
        """Draw ``batches`` batches (moved to the device); return the wall time."""
        if self.drawn + batches > len(self.loader):
            raise ValueError(
                f"an epoch has {len(self.loader)} batches and {self.drawn} are drawn; "
                f"cannot draw {batches} more without restarting the workers"
            )
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(batches):
            x, y = next(self._iterator)
            if self.device.type == "cuda":
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
        _sync(self.device)
        self.drawn += batches
        return time.perf_counter() - start

    def close(self) -> None:
        """Stop the worker processes."""
        self._iterator = None  # type: ignore[assignment]


def bench_data(cfg: BenchConfig, dm: ImageDataModule, log: Log, workers: int = 2) -> dict:
    """Batches/s of ImageDataModule vs torchvision's per-sample DataLoader, interleaved.

    On the CPU ImageDataModule is also timed with one torch thread: its batch operations are
    small, and with several intra-op threads on a busy machine every parallel region waits
    for a descheduled thread (milliseconds each), while DataLoader workers run one thread each.
    """
    log(f"data pipeline: {cfg.data_rounds} rounds of {cfg.data_batches} batches")
    dm.trainer = None  # stand-alone: no precision plugin from an earlier fit
    ours = OurBatches(dm, cfg.device)
    warmup = 2 * workers
    theirs = TorchvisionBatches(dm, workers=workers, device=cfg.device, warmup=warmup)
    batches = min(cfg.data_batches, (len(theirs) - warmup) // (cfg.data_rounds + 1))

    def one_thread() -> float:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return ours.run(batches)
        finally:
            torch.set_num_threads(threads)

    workloads: dict[str, Callable[[], float | None]] = {
        "gradtrace": lambda: ours.run(batches),
        "torchvision": lambda: theirs.run(batches),
    }
    if cfg.device == "cpu" and torch.get_num_threads() > 1:
        workloads["gradtrace_1_thread"] = one_thread
    try:
        # The DataLoader's workers go on prefetching after each of its turns; waiting before
        # every turn (outside the timings) keeps them from competing with the next workload.
        samples = interleave(
            workloads, cfg.data_rounds, warmup=1, between=lambda _: time.sleep(PREFETCH_SETTLE_S)
        )
    finally:
        theirs.close()
    rate = {name: [batches / t for t in times] for name, times in samples.items()}
    out = {
        "batches_per_s": {name: Summary.of(v) for name, v in rate.items()},
        "speedup": Summary.of(ratios(rate["gradtrace"], rate["torchvision"])),
        "batches_per_round": batches,
        "torchvision_workers": workers,
        "threads": torch.get_num_threads(),
    }
    if "gradtrace_1_thread" in rate:
        out["speedup_1_thread"] = Summary.of(
            ratios(rate["gradtrace_1_thread"], rate["torchvision"])
        )
    return out
