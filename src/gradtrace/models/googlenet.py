"""GoogLeNet (Inception v1, Szegedy et al., "Going Deeper with Convolutions", arXiv:1409.4842).

Faithful to the paper's Table 1, which torchvision is not: the third branch of every
inception module is a true 5x5 convolution (torchvision uses 3x3 there).

* stem (``stem="imagenet"``, the table of the lecture notes "Lecture 8: CNN Architectures I"):
  7x7/2 conv 64, 3x3/2 max-pool, 1x1 conv 64,
  3x3 conv 192, 3x3/2 max-pool: 224 -> 28, 124,416 parameters. The 2014 network's two local
  response normalisation layers are left out, as in the lecture's table and torchvision
  (they hold no parameters). ``stem="cifar"`` keeps the three convolutions but not the
  downsampling (3x3 conv instead of 7x7/2, no pools), so a 32x32 image reaches inception 3a
  at 32x32 and 4a at 16x16, where the auxiliary heads' 5x5/3 pooling gives the same 4x4 map
  as at 224.
* nine inception modules (``INCEPTION_TABLE``), max-pools (3x3/2) after 3b and 4e, global
  average pooling, dropout 0.4, a linear classifier.
* auxiliary classifiers after 4a and 4d (``aux_logits``): 5x5/3 average pool, 1x1 conv 128,
  FC 1024, dropout 0.7, FC classes. In training mode the model returns
  ``AuxLogits(logits, (aux1, aux2))``; in eval mode (or with ``aux_logits=False``) only the
  main logits. The training loop weights the auxiliary losses 0.3.
* ``batch_norm=False`` is the 2014 original: every conv has a bias and is followed by ReLU,
  initialised as in the BVLC Caffe model (Caffe's "xavier" filler, i.e. uniform with variance
  1/fan_in, and biases 0.2, classifiers' biases 0). ``batch_norm=True`` puts BN between each
  conv (then without bias) and its ReLU.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from gradtrace.checks import check_choice
from gradtrace.models.layers import AuxLogits
from gradtrace.models.registry import register_model

__all__ = ["INCEPTION_TABLE", "GoogLeNet", "Inception", "InceptionAux"]

# Table 1 of the paper: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
INCEPTION_TABLE: dict[str, tuple[int, int, int, int, int, int]] = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}
STEMS = ("imagenet", "cifar")


def inception_out_channels(name: str) -> int:
    """Channels an inception module outputs: the sum of its four branches."""
    c1, _, c3, _, c5, pool = INCEPTION_TABLE[name]
    return c1 + c3 + c5 + pool


class ConvBlock(nn.Module):
    """conv -> [BN] -> ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        batch_norm: bool,
        stride: int = 1,
        padding: int = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, bias=not batch_norm
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001) if batch_norm else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    """Four parallel branches, concatenated: 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | 3x3 pool -> 1x1."""

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        batch_norm: bool,
    ) -> None:
        super().__init__()
        self.branch1 = ConvBlock(in_channels, ch1x1, 1, batch_norm)
        self.branch2 = nn.Sequential(
            OrderedDict(
                reduce=ConvBlock(in_channels, ch3x3red, 1, batch_norm),
                conv3x3=ConvBlock(ch3x3red, ch3x3, 3, batch_norm, padding=1),
            )
        )
        self.branch3 = nn.Sequential(
            OrderedDict(
                reduce=ConvBlock(in_channels, ch5x5red, 1, batch_norm),
                conv5x5=ConvBlock(ch5x5red, ch5x5, 5, batch_norm, padding=2),
            )
        )
        self.branch4 = nn.Sequential(
            OrderedDict(
                pool=nn.MaxPool2d(3, stride=1, padding=1),
                proj=ConvBlock(in_channels, pool_proj, 1, batch_norm),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch1, self.branch2, self.branch3, self.branch4)
        return torch.cat([branch(x) for branch in branches], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier: 5x5/3 avg-pool, 1x1 conv 128, FC 1024, dropout 0.7, FC classes."""

    def __init__(
        self, in_channels: int, num_classes: int, batch_norm: bool, dropout: float = 0.7
    ) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(5, stride=3)
        self.conv = ConvBlock(in_channels, 128, 1, batch_norm)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not all(14 <= side <= 16 for side in x.shape[-2:]):
            # Checked before the 5x5/3 pooling, which fails on small maps with a bare
            # "Output size is too small".
            height, width = x.shape[-2:]
            raise ValueError(
                "GoogLeNet's auxiliary heads need a 14x14 to 16x16 map after inception 4a: "
                "224x224 images with stem='imagenet' (the default), 32x32 with stem='cifar' "
                "(--model.arch_kwargs '{stem: cifar}', as in --config arch/googlenet); got a "
                f"{height}x{width} map. aux_logits=False takes other sizes"
            )
        x = self.pool(x)
        x = self.relu(self.fc1(torch.flatten(self.conv(x), 1)))
        return self.fc2(self.dropout(x))


class GoogLeNet(nn.Module):
    """Inception v1; see the module docstring."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        aux_logits: bool = True,
        batch_norm: bool = False,
        stem: str = "imagenet",
        dropout: float = 0.4,
        aux_dropout: float = 0.7,
    ) -> None:
        super().__init__()
        check_choice("stem", stem, STEMS)
        for option, p in (("dropout", dropout), ("aux_dropout", aux_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{option} must be in [0, 1); got {p}")
        bn = batch_norm
        if stem == "imagenet":
            self.stem = nn.Sequential(
                OrderedDict(
                    conv1=ConvBlock(in_chans, 64, 7, bn, stride=2, padding=3),
                    pool1=nn.MaxPool2d(3, stride=2, ceil_mode=True),
                    conv2=ConvBlock(64, 64, 1, bn),
                    conv3=ConvBlock(64, 192, 3, bn, padding=1),
                    pool2=nn.MaxPool2d(3, stride=2, ceil_mode=True),
                )
            )
        else:
            self.stem = nn.Sequential(
                OrderedDict(
                    conv1=ConvBlock(in_chans, 64, 3, bn, padding=1),
                    conv2=ConvBlock(64, 64, 1, bn),
                    conv3=ConvBlock(64, 192, 3, bn, padding=1),
                )
            )
        self.inception3a = Inception(192, *INCEPTION_TABLE["3a"], bn)
        self.inception3b = Inception(inception_out_channels("3a"), *INCEPTION_TABLE["3b"], bn)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = Inception(inception_out_channels("3b"), *INCEPTION_TABLE["4a"], bn)
        self.aux1 = (
            InceptionAux(inception_out_channels("4a"), num_classes, bn, aux_dropout)
            if aux_logits
            else None
        )
        self.inception4b = Inception(inception_out_channels("4a"), *INCEPTION_TABLE["4b"], bn)
        self.inception4c = Inception(inception_out_channels("4b"), *INCEPTION_TABLE["4c"], bn)
        self.inception4d = Inception(inception_out_channels("4c"), *INCEPTION_TABLE["4d"], bn)
        self.aux2 = (
            InceptionAux(inception_out_channels("4d"), num_classes, bn, aux_dropout)
            if aux_logits
            else None
        )
        self.inception4e = Inception(inception_out_channels("4d"), *INCEPTION_TABLE["4e"], bn)
        self.maxpool4 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception5a = Inception(inception_out_channels("4e"), *INCEPTION_TABLE["5a"], bn)
        self.inception5b = Inception(inception_out_channels("5a"), *INCEPTION_TABLE["5b"], bn)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(inception_out_channels("5b"), num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        classifiers = {self.fc} | {aux.fc2 for aux in (self.aux1, self.aux2) if aux is not None}
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                # Caffe's "xavier": uniform with variance 1 / fan_in.
                nn.init.kaiming_uniform_(m.weight, nonlinearity="linear")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.0 if m in classifiers else 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor | AuxLogits:
        x = self.stem(x)
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        aux_on = self.training and self.aux1 is not None and self.aux2 is not None
        aux1 = self.aux1(x) if aux_on else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if aux_on else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        logits = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        if aux_on:
            return AuxLogits(logits, (aux1, aux2))
        return logits


@register_model(family="googlenet", input_size=(3, 224, 224), num_classes=1000)
def googlenet(
    num_classes: int = 1000,
    in_chans: int = 3,
    aux_logits: bool = True,
    batch_norm: bool = False,
    stem: str = "imagenet",
    dropout: float = 0.4,
    aux_dropout: float = 0.7,
) -> GoogLeNet:
    """GoogLeNet / Inception v1 with true 5x5 branches and auxiliary heads (2014 paper)."""
    return GoogLeNet(
        num_classes,
        in_chans,
        aux_logits=aux_logits,
        batch_norm=batch_norm,
        stem=stem,
        dropout=dropout,
        aux_dropout=aux_dropout,
    )
