"""Training-batch augmentation and input normalisation, on whole batches on the device.

``augment`` is one of :data:`AUGMENTATIONS`: ``none``, ``crop`` (random crop from the image
zero-padded by ``crop_padding`` pixels) or ``crop_flip`` (the crop, then a horizontal flip with
probability 1/2: the coursework's CIFAR augmentation). Booleans are kept as shorthands:
``true`` is ``crop_flip`` (what it always meant), ``false`` is ``none``. ``normalization`` is one
of :data:`NORMALIZATIONS`: ``split`` (the training split's own per-channel statistics) or
``cifar10`` (the fixed constants of the original coursework code, :data:`CIFAR10_MEAN`,
:data:`CIFAR10_STD`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gradtrace.checks import check_choice
from gradtrace.data import derive_seed

__all__ = [
    "AUGMENTATIONS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "NORMALIZATIONS",
    "channel_stats",
    "crop_flip",
    "normalize",
    "resolve_augment",
    "sample_crops",
]

AUGMENTATIONS = ("none", "crop", "crop_flip")
NORMALIZATIONS = ("split", "cifar10")
#: The original coursework code's input normalisation (CIFAR-10 statistics, used for CIFAR-100
#: too).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def resolve_augment(augment: str | bool | None, default: str) -> str:
    """``augment`` as one of :data:`AUGMENTATIONS`: ``None`` is ``default``, ``True`` is
    ``crop_flip``, ``False`` is ``none``."""
    if augment is None:
        return default
    if isinstance(augment, bool):
        return "crop_flip" if augment else "none"
    check_choice("augment", augment, AUGMENTATIONS)
    return augment


def sample_crops(
    seed: int, epoch: int, step: int, num_images: int, padding: int, flip: bool = True
) -> torch.Tensor:
    """``[num_images, 3]`` int64 ``(top, left, flip)`` for one global training batch.

    ``top`` and ``left`` are the crop's corner in the zero-padded image (``0 .. 2 * padding``);
    ``flip`` is 1 for a horizontal flip (always 0 when ``flip`` is false; the crops are the
    same either way). A pure function of ``(seed, epoch, step)``.
    """
    generator = torch.Generator().manual_seed(derive_seed("crops", seed, epoch, step))
    offsets = torch.randint(0, 2 * padding + 1, (num_images, 2), generator=generator)
    flips = torch.randint(0, 2, (num_images, 1), generator=generator)
    return torch.cat([offsets, flips if flip else torch.zeros_like(flips)], dim=1)


def crop_flip(images: torch.Tensor, crops: torch.Tensor, padding: int) -> torch.Tensor:
    """Random-crop (zero padding ``padding``) then horizontally flip a batch: pad + one gather.

    Output pixel ``(i, j)`` of image ``n`` is padded-image pixel ``(i + top, j' + left)`` with
    ``j' = W - 1 - j`` when flipped, i.e. the same as torchvision's ``RandomCrop(padding)``
    followed by ``RandomHorizontalFlip`` at those offsets. Works on any dtype and device.
    """
    n, channels, height, width = images.shape
    crops = crops.to(images.device)
    top, left, flip = crops[:, 0:1], crops[:, 1:2], crops[:, 2:3].bool()
    padded = F.pad(images, (padding, padding, padding, padding))
    padded_width = width + 2 * padding
    rows = torch.arange(height, device=images.device) + top  # [n, H] rows of the padded image
    cols = torch.arange(width, device=images.device).expand(n, width)
    cols = torch.where(flip, width - 1 - cols, cols) + left  # [n, W] its columns
    source = (rows[:, :, None] * padded_width + cols[:, None, :]).view(n, 1, height * width)
    out = padded.view(n, channels, -1).gather(2, source.expand(n, channels, -1))
    return out.view(n, channels, height, width)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> float32 ``(x / 255 - mean) / std``; ``mean``, ``std`` in [0, 1]."""
    shape = (1, -1, 1, 1)
    return images.float().mul_((1.0 / (255.0 * std)).view(shape)).add_((-mean / std).view(shape))


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of uint8 images, in [0, 1] units (float32).

    Computed from exact per-channel histograms, so the result does not depend on summation
    order (the same on every device and process count).
    """
    values = torch.arange(256, dtype=torch.float64)
    histograms = torch.stack(
        [torch.bincount(images[:, c].reshape(-1), minlength=256) for c in range(images.shape[1])]
    ).to("cpu", torch.float64)
    count = histograms.sum(1)
    mean = histograms @ values / count
    var = (histograms @ values.square() / count - mean.square()).clamp_min(0)
    return (mean / 255).float(), (var.sqrt() / 255).float()
