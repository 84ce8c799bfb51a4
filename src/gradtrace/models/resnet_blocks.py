"""The residual blocks of :mod:`gradtrace.models.resnet`: basic and bottleneck, post- and
pre-activation, and their shortcuts.

A shortcut is an identity, option A (subsample and zero-pad: no parameters), option B (1x1
conv + norm projection) or none at all (the plain networks). The pre-activation blocks follow
"Identity Mappings in Deep Residual Networks" (arXiv:1603.05027): BN-ReLU before each conv,
nothing after the addition, a projection shortcut fed the pre-activated input. Modules keep
torchvision's names (``bn1``, ``relu1``) whatever norm and activation they hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradtrace.models.layers import ActLayer, NormLayer

__all__ = [
    "BLOCKS",
    "BasicBlock",
    "Bottleneck",
    "PreActBasicBlock",
    "PreActBottleneck",
    "ZeroPadShortcut",
    "conv3x3",
]


class ZeroPadShortcut(nn.Module):
    """Option A: subsample by ``stride`` and append zero channels up to ``out_planes``."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


def _shortcut(
    kind: str, in_planes: int, out_planes: int, stride: int, norm: NormLayer
) -> nn.Module | None:
    """The skip path of one block: ``"identity"``, ``"zeropad"`` (option A), ``"project"``
    (1x1 conv + norm, option B) or ``"none"`` (plain network: no skip at all)."""
    if kind == "none":
        return None
    if kind == "zeropad":
        return ZeroPadShortcut(in_planes, out_planes, stride)
    if kind == "project":
        return nn.Sequential(
            nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
            norm(out_planes),
        )
    return nn.Identity()


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution without bias, padded to keep the resolution at stride 1."""
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``: two 3x3 convs."""

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int,
        shortcut: str,
        norm: NormLayer = nn.BatchNorm2d,
        act: ActLayer = nn.ReLU,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = norm(planes)
        self.relu1 = act()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm(planes)
        self.shortcut = _shortcut(shortcut, in_planes, planes, stride, norm)
        self.relu2 = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.relu2(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, "ResNet v1.5" as torchvision), 1x1 expand x4."""

    expansion = 4

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int,
        shortcut: str,
        norm: NormLayer = nn.BatchNorm2d,
        act: ActLayer = nn.ReLU,
    ) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = _conv1x1(in_planes, planes)
        self.bn1 = norm(planes)
        self.relu1 = act()
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = norm(planes)
        self.relu2 = act()
        self.conv3 = _conv1x1(planes, out_planes)
        self.bn3 = norm(out_planes)
        self.shortcut = _shortcut(shortcut, in_planes, out_planes, stride, norm)
        self.relu3 = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.relu3(out)


class PreActBasicBlock(nn.Module):
    """``conv(relu(bn(conv(relu(bn(x)))))) + shortcut(x)``."""

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int,
        shortcut: str,
        norm: NormLayer = nn.BatchNorm2d,
        act: ActLayer = nn.ReLU,
    ) -> None:
        super().__init__()
        self.bn1 = norm(in_planes)
        self.relu1 = act()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = norm(planes)
        self.relu2 = act()
        self.conv2 = conv3x3(planes, planes)
        self.shortcut = _shortcut(shortcut, in_planes, planes, stride, norm)
        self.project = shortcut == "project"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        if self.shortcut is not None:
            out = out + self.shortcut(pre if self.project else x)
        return out


class PreActBottleneck(nn.Module):
    """Bottleneck with BN-ReLU before each conv and nothing after the addition."""

    expansion = 4

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int,
        shortcut: str,
        norm: NormLayer = nn.BatchNorm2d,
        act: ActLayer = nn.ReLU,
    ) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = norm(in_planes)
        self.relu1 = act()
        self.conv1 = _conv1x1(in_planes, planes)
        self.bn2 = norm(planes)
        self.relu2 = act()
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = norm(planes)
        self.relu3 = act()
        self.conv3 = _conv1x1(planes, out_planes)
        self.shortcut = _shortcut(shortcut, in_planes, out_planes, stride, norm)
        self.project = shortcut == "project"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(pre)))
        out = self.conv3(self.relu3(self.bn3(self.conv2(out))))
        if self.shortcut is not None:
            out = out + self.shortcut(pre if self.project else x)
        return out


# (block, preact) -> block class
BLOCKS: dict[tuple[str, bool], type[nn.Module]] = {
    ("basic", False): BasicBlock,
    ("basic", True): PreActBasicBlock,
    ("bottleneck", False): Bottleneck,
    ("bottleneck", True): PreActBottleneck,
}
