"""Synthetic data: seeded, learnable, class-conditional images of any size and class count.

Only behind an explicit choice (``dataset: synthetic``, the demo's ``--synthetic``): its
numbers say nothing about real data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gradtrace.data.image_data import ImageData, Split, derive_seed

__all__ = ["read_synthetic", "synthetic_images", "synthetic_templates"]

_TEMPLATE_GRID = 4  # each class template is a random 4x4 pattern, smoothly upsampled
_CONTRAST = 48.0  # grey levels per template standard deviation
_NOISE = 40.0  # grey levels per noise standard deviation
_CHUNK = 4096  # images generated at once (bounds the float32 working memory)


def synthetic_templates(
    num_classes: int, channels: int, size: tuple[int, int], seed: int
) -> torch.Tensor:
    """One smooth random pattern per class, ``[K, C, H, W]`` float32, zero mean, unit std."""
    generator = torch.Generator().manual_seed(derive_seed("synthetic-templates", seed))
    grid = torch.randn(num_classes, channels, _TEMPLATE_GRID, _TEMPLATE_GRID, generator=generator)
    templates = F.interpolate(grid, size=size, mode="bicubic", align_corners=False)
    flat = templates.flatten(1)
    flat = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)
    return flat.view_as(templates)


def synthetic_images(templates: torch.Tensor, num_images: int, seed: int) -> Split:
    """``num_images`` labelled images drawn around ``templates``; balanced classes.

    Each image is its class template circularly shifted by up to 1/8 of its size in each
    direction, plus independent Gaussian pixel noise: a CNN learns it quickly, a network whose
    gradients vanish stays at chance.
    """
    num_classes, channels, height, width = templates.shape
    generator = torch.Generator().manual_seed(derive_seed("synthetic-images", seed))
    labels = (torch.arange(num_images) % num_classes)[
        torch.randperm(num_images, generator=generator)
    ]
    max_shift_y, max_shift_x = max(height // 8, 0), max(width // 8, 0)
    images = torch.empty(num_images, channels, height, width, dtype=torch.uint8)
    rows, cols = torch.arange(height), torch.arange(width)
    for start in range(0, num_images, _CHUNK):
        chunk = labels[start : start + _CHUNK]
        n = chunk.numel()
        dy = torch.randint(-max_shift_y, max_shift_y + 1, (n, 1), generator=generator)
        dx = torch.randint(-max_shift_x, max_shift_x + 1, (n, 1), generator=generator)
        source = ((rows - dy) % height)[:, :, None] * width + ((cols - dx) % width)[:, None, :]
        shifted = (
            templates[chunk].flatten(2).gather(2, source.view(n, 1, -1).expand(n, channels, -1))
        )
        noise = torch.randn(shifted.shape, generator=generator)
        pixels = shifted.mul_(_CONTRAST).add_(noise, alpha=_NOISE).add_(127.5)
        images[start : start + n] = pixels.clamp_(0, 255).round_().view(n, channels, height, width)
    return images, labels


def read_synthetic(
    num_classes: int, channels: int, size: tuple[int, int], sizes: tuple[int, int], seed: int = 0
) -> ImageData:
    """A synthetic dataset: ``sizes = (training pool, test)`` images from shared templates."""
    templates = synthetic_templates(num_classes, channels, size, seed)
    return ImageData(
        train=synthetic_images(templates, sizes[0], derive_seed("train", seed)),
        test=synthetic_images(templates, sizes[1], derive_seed("test", seed)),
        val=None,
        classes=tuple(f"class_{k}" for k in range(num_classes)),
    )
