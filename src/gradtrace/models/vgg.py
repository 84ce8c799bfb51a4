"""Classic VGG (Simonyan & Zisserman, 2015) and the CIFAR-10 VGG of seed 000.

``vgg11/13/16/19`` follow torchvision's layout (3x3 convs with bias, optional BN after each,
five 2x2 max-pools, a 7x7 adaptive pool and a 4096-4096 MLP), so their parameter counts
match torchvision exactly: vgg16 138,357,544, with ``batch_norm`` 138,365,992.
``head="cifar"`` is the usual small-image head: 32x32 inputs leave the five pools at 1x1,
so the classifier is the same three-layer MLP on a 1x1 pool, 512 wide.

Modules are named after the paper (``features.conv3_2``, ``classifier.fc6``) so per-layer
gradient plots read like its tables.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from gradtrace.checks import check_choice, check_range
from gradtrace.models.layers import init_weights
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


class VGG(nn.Module):
    """VGG-11/13/16/19 ("configurations A, B, D, E"), torchvision-compatible layout."""

    def __init__(
        self,
        depth: int = 16,
        num_classes: int = 1000,
        in_chans: int = 3,
        batch_norm: bool = False,
        head: str = "imagenet",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if depth not in CONFIGS:
            raise ValueError(f"depth must be one of 11, 13, 16, 19; got {depth}")
        check_choice("head", head, tuple(HEADS))
        check_range("dropout", dropout, 0.0, 1.0, high_inclusive=False)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_chans
        for stage, (convs, width) in enumerate(zip(CONFIGS[depth], WIDTHS), start=1):
            for i in range(1, convs + 1):
                layers[f"conv{stage}_{i}"] = nn.Conv2d(channels, width, 3, padding=1)
                if batch_norm:
                    layers[f"bn{stage}_{i}"] = nn.BatchNorm2d(width)
                layers[f"relu{stage}_{i}"] = nn.ReLU()
                channels = width
            layers[f"pool{stage}"] = nn.MaxPool2d(2, stride=2)
        self.features = nn.Sequential(layers)
        pool, hidden = HEADS[head]
        self.avgpool = nn.AdaptiveAvgPool2d(pool)
        self.classifier = nn.Sequential(
            OrderedDict(
                fc6=nn.Linear(channels * pool * pool, hidden),
                relu6=nn.ReLU(),
                drop6=nn.Dropout(dropout),
                fc7=nn.Linear(hidden, hidden),
                relu7=nn.ReLU(),
                drop7=nn.Dropout(dropout),
                fc8=nn.Linear(hidden, num_classes),
            )
        )
        # torchvision's initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def classic_vgg(
    num_classes: int = 1000,
    in_chans: int = 3,
    depth: int = 16,
    batch_norm: bool = False,
    head: str = "imagenet",
    dropout: float = 0.5,
) -> VGG:
    """Classic VGG; ``head="cifar"`` for 32x32 inputs."""
    return VGG(depth, num_classes, in_chans, batch_norm=batch_norm, head=head, dropout=dropout)


for _depth in CONFIGS:
    register_model(
        f"vgg{_depth}",
        family="vgg",
        input_size=(3, 224, 224),
        num_classes=1000,
        depth=_depth,
        description=f"VGG-{_depth} (torchvision layout; batch_norm, head='cifar' for 32x32)",
    )(classic_vgg)


class CifarVGG(nn.Module):
    """The CIFAR-10 VGG of seed 000 (section IV of the paper).

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
        init_weights(self, "kaiming", "relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))


@register_model(family="vgg", input_size=(3, 32, 32), num_classes=10)
def vgg_cifar10(
    num_classes: int = 10, in_chans: int = 3, convs_per_block: int = 2, dropout: float = 0.5
) -> CifarVGG:
    """The CIFAR-10 VGG of seed 000: Conv-BN-ReLU blocks 64/128/256, GAP, dropout, He init."""
    return CifarVGG(num_classes, in_chans, convs_per_block=convs_per_block, dropout=dropout)
