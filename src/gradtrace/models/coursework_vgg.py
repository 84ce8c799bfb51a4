"""The coursework VGG behind Table 1 of the MLP Coursework 2 report (VGG08, VGG38 and fixes).

The layout is the original coursework code's (``ConvolutionalNetwork`` in
``pytorch_mlp_framework/model_architectures.py`` of the VICO-UoE/mlpractical repository),
every convolution 3x3 with ``width`` filters and padding 1:

* stem: conv (no bias) -> BatchNorm -> activation; this one BN exists in every variant;
* three stages, each ``b`` processing blocks then one reduction block:
  processing block ``conv -> act -> conv -> act`` (convs without bias),
  reduction block ``conv -> act -> avgpool 2x2 -> conv -> act`` (convs with bias);
* global average pool -> linear head.

Depth counts weight layers: ``8 + 6 * b`` (VGG08: b = 0, VGG38: b = 5). ``batch_norm`` puts BN
after every conv, before its activation ("Batch Normalization", arXiv:1502.03167);
``norm``/``norm_layer`` put any other normalisation there (group, layer, none) and leave the
stem's BN as it is, so variants differ in the blocks only. ``residual`` turns a processing
block into ``act(F(x) + x)`` ("Deep Residual Learning for Image Recognition",
arXiv:1512.03385). Table 1 has no skip across reduction blocks; ``downsample_shortcut`` adds one
of the report's two proposals there (a strided 1x1 conv, or the same average pooling).
"""

from __future__ import annotations

import torch
from torch import nn

from gradtrace.checks import check_choice
from gradtrace.models.layers import (
    ACT_LAYERS,
    ActLayer,
    NormLayer,
    init_weights,
    resolve_act_layer,
    resolve_norm_layer,
)
from gradtrace.models.registry import register_model

__all__ = ["CourseworkVGG", "valid_depth"]

SHORTCUTS = ("none", "conv1x1", "avgpool")


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
    """``conv -> norm -> act -> conv -> norm -> (+ x if residual) -> act``, no conv biases.

    The norm layers keep torchvision's names (``bn1``, ``bn2``) whatever they are.
    """

    def __init__(
        self, width: int, norm_layer: NormLayer, act_layer: ActLayer, residual: bool
    ) -> None:
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = norm_layer(width)
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = norm_layer(width)
        self.act2 = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + x if self.residual else out)


class ReductionBlock(nn.Module):
    """``conv -> norm -> act -> avgpool -> conv -> norm -> (+ shortcut) -> act``, with biases."""

    def __init__(
        self, width: int, norm_layer: NormLayer, act_layer: ActLayer, shortcut: str
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = norm_layer(width)
        self.act1 = act_layer()
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = norm_layer(width)
        self.act2 = act_layer()
        self.shortcut: nn.Module | None
        if shortcut == "conv1x1":
            self.shortcut = nn.Sequential(
                nn.Conv2d(width, width, 1, stride=2, bias=False), norm_layer(width)
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
        norm_layer: NormLayer,
        act_layer: ActLayer,
        residual: bool,
        shortcut: str,
    ) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(ProcessingBlock(width, norm_layer, act_layer, residual) for _ in range(num_blocks))
        )
        self.reduction = ReductionBlock(width, norm_layer, act_layer, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.blocks(x))


class CourseworkVGG(nn.Module):
    """The Table 1 network; see the module docstring for its layout.

    Args:
        depth: weight layers, ``8 + 6 * b``.
        num_classes, in_chans: classifier outputs and input channels.
        width: filters of every convolution (32 in the coursework).
        residual: skip connections around the processing blocks.
        downsample_shortcut: skip across the reduction blocks too: ``"none"`` (Table 1),
            ``"conv1x1"`` or ``"avgpool"``; needs ``residual``.
        norm_layer: factory of the blocks' norm layers, called with the channel count;
            ``None`` is none (``nn.Identity``, Table 1's plain network).
        act_layer: factory of every activation; ``None`` is LeakyReLU(0.01), the coursework's.
        init: ``"pytorch"`` (the coursework's), ``"kaiming"`` or ``"xavier"``.
    """

    def __init__(
        self,
        depth: int = 8,
        num_classes: int = 100,
        in_chans: int = 3,
        width: int = 32,
        residual: bool = False,
        downsample_shortcut: str = "none",
        norm_layer: NormLayer | None = None,
        act_layer: ActLayer | None = None,
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
        norm_layer = norm_layer or nn.Identity
        act_layer = act_layer or ACT_LAYERS["leaky_relu"]
        self.depth = depth
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            act_layer(),
        )
        self.stages = nn.Sequential(
            *(
                Stage(width, num_blocks, norm_layer, act_layer, residual, downsample_shortcut)
                for _ in range(3)
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)
        init_weights(self, init, act_layer())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))


_FAMILY = "coursework_vgg"


@register_model(family=_FAMILY, num_classes=100)
def coursework_vgg(
    num_classes: int = 100,
    in_chans: int = 3,
    depth: int = 8,
    batch_norm: bool = False,
    residual: bool = False,
    downsample_shortcut: str = "none",
    norm: str | None = None,
    activation: str | None = None,
    init: str = "pytorch",
    width: int = 32,
    norm_layer: NormLayer | None = None,
    act_layer: ActLayer | None = None,
) -> CourseworkVGG:
    """Coursework VGG of any depth 8 + 6b (Table 1 of the MLP Coursework 2 report).

    ``batch_norm=True`` is ``norm="batch"``; ``norm`` is one of ``batch``, ``group``, ``layer``,
    ``none`` (default) and ``activation`` one of ``leaky_relu`` (default), ``relu``, ``elu``,
    ``selu``, ``sigmoid``, ``tanh``; ``norm_layer``/``act_layer`` take factories instead.
    """
    return CourseworkVGG(
        depth=depth,
        num_classes=num_classes,
        in_chans=in_chans,
        width=width,
        residual=residual,
        downsample_shortcut=downsample_shortcut,
        norm_layer=resolve_norm_layer(norm, norm_layer, batch_norm),
        act_layer=resolve_act_layer(activation, act_layer, default="leaky_relu"),
        init=init,
    )


register_model(
    "vgg08", family=_FAMILY, num_classes=100, depth=8, description="Coursework VGG08 (Table 1)"
)(coursework_vgg)
register_model(
    "vgg38", family=_FAMILY, num_classes=100, depth=38, description="Coursework VGG38 (Table 1)"
)(coursework_vgg)
