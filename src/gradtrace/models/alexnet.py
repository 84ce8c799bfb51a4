"""AlexNet as the lecture notes "Lecture 8: CNN Architectures I" analyse it (input 3x227x227),
torchvision's layout and count.

Five convolutions (64 11x11/4 pad 2, 192 5x5 pad 2, 384, 256, 256 3x3 pad 1) with 3x3/2
max-pools after the first, second and fifth, then a 9216-4096-4096-classes MLP with dropout:
61,100,840 parameters for 1000 classes. This is the single-tower network of Krizhevsky's
"One weird trick for parallelizing convolutional neural networks" (arXiv:1404.5997) that
torchvision and the lecture use, without the local response normalisation of "ImageNet
Classification with Deep Convolutional Neural Networks" (Krizhevsky et al., NeurIPS 2012).
As in torchvision, a 6x6 adaptive average pool sits before the MLP (an identity at 227x227 or
224x224) so other input sizes work.

``stem="cifar"`` swaps the 11x11/4 conv1 for a 3x3/1 one (padding 1), so a 32x32 image still
survives the three max-pools (32 -> 15 -> 7 -> 3); the adaptive pool then brings the 3x3 map
to the classifier's 6x6, leaving every other layer as in the ImageNet network.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from gradtrace.checks import check_choice
from gradtrace.models.registry import register_model

__all__ = ["AlexNet"]


class AlexNet(nn.Module):
    """AlexNet; see the module docstring."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        dropout: float = 0.5,
        stem: str = "imagenet",
    ) -> None:
        super().__init__()
        check_choice("stem", stem, ("imagenet", "cifar"))
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        if stem == "imagenet":
            conv1 = nn.Conv2d(in_chans, 64, 11, stride=4, padding=2)
        else:
            conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1)
        self.features = nn.Sequential(
            OrderedDict(
                conv1=conv1,
                relu1=nn.ReLU(),
                pool1=nn.MaxPool2d(3, stride=2),
                conv2=nn.Conv2d(64, 192, 5, padding=2),
                relu2=nn.ReLU(),
                pool2=nn.MaxPool2d(3, stride=2),
                conv3=nn.Conv2d(192, 384, 3, padding=1),
                relu3=nn.ReLU(),
                conv4=nn.Conv2d(384, 256, 3, padding=1),
                relu4=nn.ReLU(),
                conv5=nn.Conv2d(256, 256, 3, padding=1),
                relu5=nn.ReLU(),
                pool5=nn.MaxPool2d(3, stride=2),
            )
        )
        self.avgpool = nn.AdaptiveAvgPool2d(6)
        self.classifier = nn.Sequential(
            OrderedDict(
                drop6=nn.Dropout(dropout),
                fc6=nn.Linear(256 * 6 * 6, 4096),
                relu6=nn.ReLU(),
                drop7=nn.Dropout(dropout),
                fc7=nn.Linear(4096, 4096),
                relu7=nn.ReLU(),
                fc8=nn.Linear(4096, num_classes),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register_model(family="alexnet", input_size=(3, 227, 227), num_classes=1000)
def alexnet(
    num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5, stem: str = "imagenet"
) -> AlexNet:
    """AlexNet, the lecture's version (torchvision's layout, 61,100,840 parameters)."""
    return AlexNet(num_classes, in_chans, dropout=dropout, stem=stem)
