"""The coursework VGG behind Table 1 of the MLP Coursework 2 report (VGG08, VGG38 and fixes).

Layout (REFERENCE.md section 1), every convolution 3x3 with ``width`` filters and padding 1:

* stem: conv (no bias) -> BatchNorm -> activation; this one BN exists in every variant;
* three stages, each ``b`` processing blocks then one reduction block:
  processing block ``conv -> act -> conv -> act`` (convs without bias),
  reduction block ``conv -> act -> avgpool 2x2 -> conv -> act`` (convs with bias);
* global average pool -> linear head.

Depth counts weight layers: ``8 + 6 * b`` (VGG08: b = 0, VGG38: b = 5). ``batch_norm`` puts BN
after every conv, before its activation; ``residual`` turns a processing block into
``act(F(x) + x)``. Table 1 has no skip across reduction blocks; ``downsample_shortcut`` adds
one of the report's two proposals there (a strided 1x1 conv, or the same average pooling).
"""

from __future__ import annotations

import torch
from torch import nn

from gradtrace.checks import check_choice
from gradtrace.models.layers import init_weights, make_activation
from gradtrace.models.registry import register_model

__all__ = ["CourseworkVGG", "valid_depth"]

SHORTCUTS = ("none", "conv1x1", "avgpool")


def _norm(batch_norm: bool, width: int) -> nn.Module:
    return nn.BatchNorm2d(width) if batch_norm else nn.Identity()


def valid_depth(depth: int) -> int:
    """Return the number of processing blocks per stage for ``depth`` (``8 + 6 * b``).

    Raises ``ValueError`` naming the nearest valid depths otherwise.
    """
    if depth >= 8 and (depth - 8) % 6 == 0:
        return (depth - 8) // 6
    below = max(8, 8 + 6 * ((depth - 8) // 6))
    above = below + 6 if depth > below else below
    nearest = sorted({below, above})
    raise ValueError(
        f"depth must be 8 + 6*b (8, 14, 20, 26, 32, 38, ...); got {depth}, "
        f"nearest valid: {', '.join(map(str, nearest))}"
    )


class ProcessingBlock(nn.Module):
    """``conv -> [BN] -> act -> conv -> [BN] -> (+ x if residual) -> act``, no conv biases."""

    def __init__(self, width: int, batch_norm: bool, residual: bool, activation: str) -> None:
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = _norm(batch_norm, width)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = _norm(batch_norm, width)
        self.act2 = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + x if self.residual else out)


class ReductionBlock(nn.Module):
    """``conv -> [BN] -> act -> avgpool -> conv -> [BN] -> (+ shortcut) -> act``, with biases."""

    def __init__(self, width: int, batch_norm: bool, activation: str, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = _norm(batch_norm, width)
        self.act1 = make_activation(activation)
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = _norm(batch_norm, width)
        self.act2 = make_activation(activation)
        self.shortcut: nn.Module | None
        if shortcut == "conv1x1":
            self.shortcut = nn.Sequential(
                nn.Conv2d(width, width, 1, stride=2, bias=False), _norm(batch_norm, width)
            )
        elif shortcut == "avgpool":
            self.shortcut = nn.AvgPool2d(2)
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.act1(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.act2(out)


class Stage(nn.Module):
    """``b`` processing blocks at one resolution, then a reduction block halving it."""

    def __init__(
        self,
        width: int,
        num_blocks: int,
        batch_norm: bool,
        residual: bool,
        activation: str,
        shortcut: str,
    ) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(ProcessingBlock(width, batch_norm, residual, activation) for _ in range(num_blocks))
        )
        self.reduction = ReductionBlock(width, batch_norm, activation, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.blocks(x))


class CourseworkVGG(nn.Module):
    """The Table 1 network; see the module docstring for its layout."""

    def __init__(
        self,
        depth: int = 8,
        num_classes: int = 100,
        in_chans: int = 3,
        width: int = 32,
        batch_norm: bool = False,
        residual: bool = False,
        downsample_shortcut: str = "none",
        activation: str = "leaky_relu",
        init: str = "pytorch",
    ) -> None:
        super().__init__()
        num_blocks = valid_depth(depth)
        check_choice("downsample_shortcut", downsample_shortcut, SHORTCUTS)
        if downsample_shortcut != "none" and not residual:
            raise ValueError(
                f"downsample_shortcut={downsample_shortcut!r} adds a skip across the reduction "
                "blocks and needs residual=True; use downsample_shortcut='none' without it"
            )
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.depth = depth
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            make_activation(activation),
        )
        self.stages = nn.Sequential(
            *(
                Stage(width, num_blocks, batch_norm, residual, activation, downsample_shortcut)
                for _ in range(3)
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)
        init_weights(self, init, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))


_FAMILY = "coursework_vgg"


@register_model(family=_FAMILY, num_classes=100)
def vgg(
    num_classes: int = 100,
    in_chans: int = 3,
    depth: int = 8,
    batch_norm: bool = False,
    residual: bool = False,
    downsample_shortcut: str = "none",
    activation: str = "leaky_relu",
    init: str = "pytorch",
    width: int = 32,
) -> CourseworkVGG:
    """Coursework VGG of any depth 8 + 6b (Table 1 of the MLP Coursework 2 report)."""
    return CourseworkVGG(
        depth=depth,
        num_classes=num_classes,
        in_chans=in_chans,
        width=width,
        batch_norm=batch_norm,
        residual=residual,
        downsample_shortcut=downsample_shortcut,
        activation=activation,
        init=init,
    )


register_model(
    "vgg08", family=_FAMILY, num_classes=100, depth=8, description="Coursework VGG08 (Table 1)"
)(vgg)
register_model(
    "vgg38", family=_FAMILY, num_classes=100, depth=38, description="Coursework VGG38 (Table 1)"
)(vgg)
