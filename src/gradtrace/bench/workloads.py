"""What the bench times: the plain PyTorch baselines, matmul, data pipelines, FLOP counts.

The baselines are what a researcher would write by hand, doing the same work as gradtrace:
the same network from :func:`gradtrace.models.create_model`, the same uint8 tensors, the same
augmentation functions (:func:`~gradtrace.datamodule.crop_flip`,
:func:`~gradtrace.datamodule.normalize`), Adam with the same cosine schedule, batch 100.
"""

from __future__ import annotations

import collections
import os
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from gradtrace.datamodule import (
    ImageDataModule,
    TrainBatches,
    crop_flip,
    epoch_order,
    normalize,
    sample_crops,
)
from gradtrace.models import create_model

__all__ = [
    "HostSyncCounter",
    "Matmul",
    "OurBatches",
    "PlainLoop",
    "TorchvisionBatches",
    "train_step_flops",
]


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


def train_step_flops(
    arch: str,
    batch_size: int = 100,
    *,
    num_classes: int = 100,
    image_size: tuple[int, int] = (32, 32),
    model_options: dict[str, Any] | None = None,
) -> int:
    """FLOPs of one training step's forward + backward (``torch.utils.flop_counter``).

    Counted on the meta device (no arithmetic runs): convolutions and matmuls, as
    ``FlopCounterMode`` counts them (element-wise work and the optimizer are not FLOPs here).
    """
    with torch.device("meta"):
        net = create_model(arch, num_classes=num_classes, **(model_options or {}))
        x = torch.empty(batch_size, 3, *image_size)
        y = torch.zeros(batch_size, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(net(x), y).backward()
    return int(counter.get_total_flops())


class Matmul:
    """A dense ``size x size`` matmul: the practical limit of the device's arithmetic.

    :meth:`run` multiplies ``repeat`` times (about 50 ms) in each of ``trials`` tries and
    returns the fastest try: the limit is what the machine can do, and a short burst of
    another process's work should not lower it. ``flops / run()`` is the achieved FLOP/s.
    """

    def __init__(
        self,
        size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        trials: int = 5,
    ) -> None:
        self.device = torch.device(device)
        self.trials = trials
        generator = torch.Generator().manual_seed(0)
        self.a = torch.randn(size, size, generator=generator).to(self.device, dtype)
        self.b = torch.randn(size, size, generator=generator).to(self.device, dtype)
        self.a @ self.b  # the first call starts the library up
        self.repeat = 1
        self.repeat = max(1, round(0.05 / max(self._once(), 1e-9)))
        self.flops = 2 * size**3 * self.repeat

    def _once(self) -> float:
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(self.repeat):
            self.a @ self.b
        _sync(self.device)
        return time.perf_counter() - start

    def run(self) -> float:
        """The fastest of ``trials`` tries of ``repeat`` multiplications, in seconds."""
        return min(self._once() for _ in range(self.trials))


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


# ---------------------------------------------------------------------------------------------
# Host syncs

_aten = torch.ops.aten
# Ops that make the host wait for the device: reading a value back (.item(), bool(t),
# .tolist()) and ops whose output size depends on the data.
_SYNC_OPS = frozenset(
    {
        _aten._local_scalar_dense,
        _aten.nonzero,
        _aten._unique2,
        _aten.unique_dim,
        _aten.unique_consecutive,
        _aten.masked_select,
        _aten.bincount,
        _aten.equal,
        _aten.is_nonzero,
        _aten.repeat_interleave,
    }
)
_TORCH_DIR = str(Path(torch.__file__).parent) + os.sep
_THIS_FILE = str(Path(__file__))
# torch's own machinery between an op and a dispatch mode: never "where it happened"
_MACHINERY = (
    os.path.join(_TORCH_DIR, "_dynamo", ""),
    os.path.join(_TORCH_DIR, "utils", "_python_dispatch.py"),
    os.path.join(_TORCH_DIR, "_ops.py"),
    os.path.join(_TORCH_DIR, "_compile.py"),
)


def _copy_direction(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """``device-to-host copy`` or ``blocking host-to-device copy`` (both wait), else None.

    A copy to the CPU waits for the device; a host-to-device copy with
    ``non_blocking=False`` synchronises the stream after it.
    """
    if func.overloadpacket is _aten._to_copy:
        target = kwargs.get("device")
        if target is None:
            return None
        src, dst = args[0].device.type, torch.device(target).type
        non_blocking = kwargs.get("non_blocking", False)
    elif func.overloadpacket is _aten.copy_:
        src, dst = args[1].device.type, args[0].device.type
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    else:
        return None
    if dst == "cpu" and src not in ("cpu", "meta"):
        return "device-to-host copy"
    if src == "cpu" and dst not in ("cpu", "meta") and not non_blocking:
        return "blocking host-to-device copy"
    return None


def _on_device(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.device.type not in ("cpu", "meta")


def _short(path: str) -> str:
    """A source path from its package on (``torch/optim/adam.py``, ``gradtrace/...``)."""
    for marker in ("site-packages" + os.sep, os.sep + "src" + os.sep):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


class HostSyncCounter(TorchDispatchMode):
    """Count ops that force a device-to-host sync on a GPU, by the Python code that issued them.

    A dispatch mode sees every ATen op, so it also works on the CPU, where nothing waits:
    ``.item()`` and friends (``aten._local_scalar_dense``) and ops with data-dependent output
    sizes (``nonzero``, ``unique``, ``masked_select``, ``bincount``...), copies from an
    accelerator to the CPU and blocking copies to it (only seen on an accelerator: on the CPU
    ``.cpu()`` is not even an op). Each is attributed to
    the innermost stack frame outside torch itself (``path:line (function)``, the path from its
    package on), naming the torch function it happened in, if any. Counting runs only while
    :attr:`active`.

    Caveat: on the CPU some ops check their inputs with ``.item()`` where the CUDA kernel does
    not (``F.one_hot``'s range check), so CPU counts are an upper bound of the GPU's. With
    ``device_only=True`` (for runs on an accelerator) only ops on accelerator tensors count:
    reading a CPU tensor (Adam's step counters) makes nothing wait.

    Args:
        device_only: count only ops whose inputs include an accelerator tensor.
    """

    def __init__(self, device_only: bool = False) -> None:
        super().__init__()
        self.active = False
        self.device_only = device_only
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if self.active:
            if func.overloadpacket in _SYNC_OPS and (
                not self.device_only or any(_on_device(a) for a in args)
            ):
                self.counts[self._caller(str(func.overloadpacket))] += 1
            elif (copy := _copy_direction(func, args, kwargs)) is not None:
                self.counts[self._caller(copy)] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _caller(op: str) -> str:
        inside = ""
        for frame in reversed(traceback.extract_stack()[:-2]):
            if frame.filename == _THIS_FILE or frame.filename.startswith(_MACHINERY):
                continue
            if frame.filename.startswith(_TORCH_DIR):
                inside = inside or f" in {_short(frame.filename)} ({frame.name})"
                continue
            return f"{op}{inside} from {_short(frame.filename)}:{frame.lineno} ({frame.name})"
        return f"{op}{inside}"
