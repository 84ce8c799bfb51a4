"""ResNets (He et al., 2016): the CIFAR family, its plain twins, and the ImageNet family.

* CIFAR (section 4.2 of the paper): a 3x3 conv with 16 filters, three stages of ``n`` basic
  blocks with 16, 32 and 64 filters (``depth = 6n + 2``; ``width`` makes them w, 2w, 4w),
  global average pooling, a linear head. Shortcuts are identities; where a stage halves the
  resolution and doubles the width the input is subsampled and zero-padded ("option A"),
  so shortcuts add no parameters and ``plain20/32/...`` (``residual=False``) have exactly
  as many as ``resnet20/32/...``.
* ImageNet: torchvision's layout (7x7 stem and max-pool, basic blocks for 18/34, bottleneck
  blocks with the stride on the 3x3 conv for 50/101/152, 1x1 conv + BN projections where the
  shape changes), so parameter counts match torchvision's.
* ``preact=True`` uses the pre-activation blocks of He et al.'s follow-up ("Identity mappings
  in deep residual networks"): BN-ReLU-conv inside the block, nothing after the addition,
  no BN-ReLU after the stem and one BN-ReLU before the pooling. A projection shortcut sees the
  pre-activated input, as in that paper; identity and zero-padding shortcuts see the raw input.
* ``norm``/``norm_layer`` replace every BatchNorm (blocks, stem, projections) and
  ``activation``/``act_layer`` every ReLU, as torchvision's ``norm_layer``; modules keep
  torchvision's names (``bn1``, ``relu1``) whatever they hold.

The paper is "Deep Residual Learning for Image Recognition" (arXiv:1512.03385); the follow-up
is "Identity Mappings in Deep Residual Networks" (arXiv:1603.05027).

The blocks and shortcuts are :mod:`gradtrace.models.resnet_blocks`'.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gradtrace.checks import check_choice, check_int
from gradtrace.models.layers import ActLayer, NormLayer, resolve_act_layer, resolve_norm_layer
from gradtrace.models.registry import register_model
from gradtrace.models.resnet_blocks import BLOCKS, conv3x3

__all__ = ["ResNet", "cifar_blocks", "imagenet_resnet", "resnet_cifar"]


class ResNet(nn.Module):
    """A ResNet assembled from ``blocks`` per stage; see the module docstring for the variants.

    Args:
        block: ``"basic"`` or ``"bottleneck"``.
        blocks: number of blocks in each stage.
        widths: planes of each stage (the first stage keeps the resolution, the others halve
            it in their first block).
        stem: ``"imagenet"`` (7x7/2 conv, BN, ReLU, 3x3/2 max-pool, 64 filters) or
            ``"cifar"`` (3x3 conv, BN, ReLU with ``widths[0]`` filters).
        downsample: shortcut where the shape changes: ``"zeropad"`` (option A) or
            ``"project"`` (option B).
        residual: ``False`` drops every shortcut (the paper's "plain" networks).
        preact: pre-activation blocks.
        norm_layer: factory of every norm layer, called with the channel count (BatchNorm).
        act_layer: factory of every activation (ReLU).
    """

    def __init__(
        self,
        block: str,
        blocks: Sequence[int],
        widths: Sequence[int],
        stem: str,
        downsample: str,
        residual: bool = True,
        preact: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = nn.ReLU,
    ) -> None:
        super().__init__()
        check_choice("block", block, ("basic", "bottleneck"))
        check_choice("stem", stem, ("imagenet", "cifar"))
        check_choice("downsample", downsample, ("zeropad", "project"))
        if len(blocks) != len(widths) or min(blocks, default=0) < 1:
            raise ValueError(
                f"blocks and widths need one positive entry per stage; got {blocks}, {widths}"
            )
        block_cls = BLOCKS[block, preact]
        expansion: int = block_cls.expansion  # type: ignore[assignment]
        stem_width = 64 if stem == "imagenet" else widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = conv3x3(in_chans, stem_width)
        # Pre-activation networks start their first block with BN-ReLU instead.
        self.bn1 = nn.Identity() if preact else norm_layer(stem_width)
        self.relu = nn.Identity() if preact else act_layer()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        in_planes = stem_width
        for i, (num_blocks, planes) in enumerate(zip(blocks, widths)):
            stage = []
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                out_planes = planes * expansion
                if not residual:
                    kind = "none"
                elif stride != 1 or in_planes != out_planes:
                    kind = downsample
                else:
                    kind = "identity"
                stage.append(block_cls(in_planes, planes, stride, kind, norm_layer, act_layer))
                in_planes = out_planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(blocks)
        self.final_bn = norm_layer(in_planes) if preact else nn.Identity()
        self.final_relu = act_layer() if preact else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        x = self.final_relu(self.final_bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_blocks(depth: int) -> int:
    """Blocks per stage ``n`` for a CIFAR ResNet of ``depth = 6n + 2``; ``ValueError`` otherwise."""
    if depth >= 8 and (depth - 2) % 6 == 0:
        return (depth - 2) // 6
    below = max(8, depth - (depth - 2) % 6)
    nearest = sorted({below, below + 6} if depth > below else {below})
    raise ValueError(
        f"depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110, ...); got {depth}, "
        f"nearest valid: {', '.join(map(str, nearest))}"
    )


@register_model(family="resnet_cifar", input_size=(3, 32, 32), num_classes=10)
def resnet_cifar(
    num_classes: int = 10,
    in_chans: int = 3,
    depth: int = 20,
    residual: bool = True,
    preact: bool = False,
    norm: str | None = None,
    activation: str | None = None,
    width: int = 16,
    norm_layer: NormLayer | None = None,
    act_layer: ActLayer | None = None,
) -> ResNet:
    """CIFAR ResNet of depth 6n+2 with option-A shortcuts (He et al. 2016, section 4.2).

    ``norm`` is one of ``batch`` (default), ``group``, ``layer``, ``none`` and ``activation``
    one of ``relu`` (default), ``leaky_relu``, ``elu``, ``selu``, ``sigmoid``, ``tanh``;
    ``norm_layer``/``act_layer`` take factories instead. ``width`` sets the stages' filters to
    ``width``, ``2 * width`` and ``4 * width`` (the paper's 16, 32, 64 by default).
    """
    n = cifar_blocks(depth)
    check_int("width", width, 1)
    return ResNet(
        "basic",
        (n, n, n),
        (width, 2 * width, 4 * width),
        stem="cifar",
        downsample="zeropad",
        residual=residual,
        preact=preact,
        num_classes=num_classes,
        in_chans=in_chans,
        norm_layer=resolve_norm_layer(norm, norm_layer, default="batch"),
        act_layer=resolve_act_layer(activation, act_layer, default="relu"),
    )


for _depth in (20, 32, 44, 56, 110):
    register_model(
        f"resnet{_depth}",
        family="resnet_cifar",
        num_classes=10,
        depth=_depth,
        description=f"CIFAR ResNet-{_depth}, option-A shortcuts",
    )(resnet_cifar)
    register_model(
        f"plain{_depth}",
        family="resnet_cifar",
        num_classes=10,
        depth=_depth,
        residual=False,
        description=f"CIFAR plain-{_depth}: ResNet-{_depth} without shortcuts",
    )(resnet_cifar)


# depth -> (block, blocks per stage), torchvision's table.
IMAGENET_CONFIGS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def imagenet_resnet(
    num_classes: int = 1000,
    in_chans: int = 3,
    depth: int = 50,
    residual: bool = True,
    preact: bool = False,
    norm: str | None = None,
    activation: str | None = None,
    norm_layer: NormLayer | None = None,
    act_layer: ActLayer | None = None,
) -> ResNet:
    """ImageNet ResNet (torchvision layout) of depth 18, 34, 50, 101 or 152; ``norm``,
    ``activation``, ``norm_layer`` and ``act_layer`` as for ``resnet_cifar``."""
    check_choice("depth", depth, IMAGENET_CONFIGS)
    block, blocks = IMAGENET_CONFIGS[depth]
    return ResNet(
        block,
        blocks,
        (64, 128, 256, 512),
        stem="imagenet",
        downsample="project",
        residual=residual,
        preact=preact,
        num_classes=num_classes,
        in_chans=in_chans,
        norm_layer=resolve_norm_layer(norm, norm_layer, default="batch"),
        act_layer=resolve_act_layer(activation, act_layer, default="relu"),
    )


for _depth in IMAGENET_CONFIGS:
    register_model(
        f"resnet{_depth}",
        family="resnet",
        input_size=(3, 224, 224),
        num_classes=1000,
        depth=_depth,
        description=f"ImageNet ResNet-{_depth} (torchvision layout)",
    )(imagenet_resnet)
