"""Classic VGG ("Very Deep Convolutional Networks for Large-Scale Image Recognition",
Simonyan & Zisserman, arXiv:1409.1556) and the CIFAR-10 VGG of "Stable Backpropagation in Deep
Image Recognition: A VGGNet-Centered Analysis with Modern AI Perspectives" (Meng et al.).

``vgg`` (``depth`` 11, 13, 16 or 19) and its aliases ``vgg11/13/16/19`` follow torchvision's
layout (3x3 convs with bias, optional BN after each, five 2x2 max-pools, a 7x7 adaptive pool
and a 4096-4096 MLP), so their parameter counts match torchvision exactly: vgg16 138,357,544,
with ``batch_norm`` 138,365,992. ``norm``/``norm_layer`` put another normalisation after each
conv (``none`` adds no module, as torchvision without BN); ``activation``/``act_layer``
replace every ReLU, the MLP's included; the initialisation stays torchvision's.
``head="cifar"`` is the usual small-image head: 32x32 inputs leave the five pools at 1x1,
so the classifier is the same three-layer MLP on a 1x1 pool, 512 wide.

Modules are named after the paper (``features.conv3_2``, ``classifier.fc6``) so per-layer
gradient plots read like its tables; norm layers are ``bn3_2`` whatever their kind.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from gradtrace.checks import check_choice, check_range
from gradtrace.models.layers import (
    ActLayer,
    NormLayer,
    init_weights,
    resolve_act_layer,
    resolve_norm_layer,
)
from gradtrace.models.registry import register_model

__all__ = ["VGG", "CifarVGG"]

# depth -> convs per stage; the stages have 64, 128, 256, 512, 512 filters.
CONFIGS: dict[int, tuple[int, ...]] = {
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
WIDTHS = (64, 128, 256, 512, 512)
# head -> (adaptive pool size, hidden width of the MLP)
HEADS: dict[str, tuple[int, int]] = {"imagenet": (7, 4096), "cifar": (1, 512)}


def _coursework_hint(depth: object) -> str:
    # Table 1's depths (8 + 6b: 8, 14, ..., 38) belong to the coursework network.
    if isinstance(depth, int) and depth >= 8 and (depth - 8) % 6 == 0:
        return f" (Table 1's VGG{depth:02d} is --model.arch coursework_vgg --model.depth {depth})"
    return ""


class VGG(nn.Module):
    """VGG-11/13/16/19 ("configurations A, B, D, E"), torchvision-compatible layout."""

    def __init__(
        self,
        depth: int = 16,
        num_classes: int = 1000,
        in_chans: int = 3,
        head: str = "imagenet",
        dropout: float = 0.5,
        norm_layer: NormLayer | None = None,
        act_layer: ActLayer | None = None,
    ) -> None:
        """``norm_layer`` (``None``: no normalisation) follows every conv; ``act_layer``
        (``None``: ReLU) is every activation."""
        super().__init__()
        act_layer = act_layer or nn.ReLU
        if depth not in CONFIGS:
            raise ValueError(
                f"the classic VGG's depth must be one of {', '.join(map(str, CONFIGS))}; got "
                f"{depth!r}{_coursework_hint(depth)}"
            )
        check_choice("head", head, tuple(HEADS))
        check_range("dropout", dropout, 0.0, 1.0, high_inclusive=False)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_chans
        for stage, (convs, width) in enumerate(zip(CONFIGS[depth], WIDTHS), start=1):
            for i in range(1, convs + 1):
                layers[f"conv{stage}_{i}"] = nn.Conv2d(channels, width, 3, padding=1)
                norm = norm_layer(width) if norm_layer else nn.Identity()
                if not isinstance(norm, nn.Identity):
                    layers[f"bn{stage}_{i}"] = norm
                layers[f"act{stage}_{i}"] = act_layer()
                channels = width
            layers[f"pool{stage}"] = nn.MaxPool2d(2, stride=2)
        self.features = nn.Sequential(layers)
        pool, hidden = HEADS[head]
        self.avgpool = nn.AdaptiveAvgPool2d(pool)
        self.classifier = nn.Sequential(
            OrderedDict(
                fc6=nn.Linear(channels * pool * pool, hidden),
                act6=act_layer(),
                drop6=nn.Dropout(dropout),
                fc7=nn.Linear(hidden, hidden),
                act7=act_layer(),
                drop7=nn.Dropout(dropout),
                fc8=nn.Linear(hidden, num_classes),
            )
        )
        # torchvision's initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register_model(family="vgg", input_size=(3, 224, 224), num_classes=1000)
def vgg(
    num_classes: int = 1000,
    in_chans: int = 3,
    depth: int = 16,
    batch_norm: bool = False,
    head: str = "imagenet",
    dropout: float = 0.5,
    norm: str | None = None,
    activation: str | None = None,
    norm_layer: NormLayer | None = None,
    act_layer: ActLayer | None = None,
) -> VGG:
    """Classic VGG-11/13/16/19 (torchvision layout); ``head="cifar"`` for 32x32 inputs.

    ``batch_norm=True`` is ``norm="batch"``; ``norm`` is one of ``batch``, ``group``, ``layer``,
    ``none`` (default) and ``activation`` one of ``relu`` (default), ``leaky_relu``, ``elu``,
    ``selu``, ``sigmoid``, ``tanh``; ``norm_layer``/``act_layer`` take factories instead.
    """
    return VGG(
        depth,
        num_classes,
        in_chans,
        head=head,
        dropout=dropout,
        norm_layer=resolve_norm_layer(norm, norm_layer, batch_norm),
        act_layer=resolve_act_layer(activation, act_layer, default="relu"),
    )


for _depth in CONFIGS:
    register_model(
        f"vgg{_depth}",
        family="vgg",
        input_size=(3, 224, 224),
        num_classes=1000,
        depth=_depth,
        description=f"VGG-{_depth} (torchvision layout; batch_norm, head='cifar' for 32x32)",
    )(vgg)


class CifarVGG(nn.Module):
    """The CIFAR-10 VGG of Meng et al.'s "Stable Backpropagation in Deep Image Recognition"
    (its section IV).

    Three blocks of ``convs_per_block`` 3x3 Conv-BN-ReLU layers with 64, 128 and 256 filters,
    each block followed by 2x2 max-pooling; global average pooling, dropout, a linear head;
    He (Kaiming) initialisation. The paper's L2 regularisation is the optimiser's weight
    decay, not part of the model.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        convs_per_block: int = 2,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if convs_per_block < 1:
            raise ValueError(f"convs_per_block must be >= 1; got {convs_per_block}")
        check_range("dropout", dropout, 0.0, 1.0, high_inclusive=False)
        channels = in_chans
        for b, width in enumerate((64, 128, 256), start=1):
            block: OrderedDict[str, nn.Module] = OrderedDict()
            for i in range(1, convs_per_block + 1):
                block[f"conv{i}"] = nn.Conv2d(channels, width, 3, padding=1, bias=False)
                block[f"bn{i}"] = nn.BatchNorm2d(width)
                block[f"relu{i}"] = nn.ReLU()
                channels = width
            block["pool"] = nn.MaxPool2d(2, stride=2)
            self.add_module(f"block{b}", nn.Sequential(block))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self, "kaiming", nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))


@register_model(family="vgg", input_size=(3, 32, 32), num_classes=10)
def vgg_cifar10(
    num_classes: int = 10, in_chans: int = 3, convs_per_block: int = 2, dropout: float = 0.5
) -> CifarVGG:
    """Meng et al.'s CIFAR-10 VGG: Conv-BN-ReLU blocks 64/128/256, GAP, dropout, He init."""
    return CifarVGG(num_classes, in_chans, convs_per_block=convs_per_block, dropout=dropout)
