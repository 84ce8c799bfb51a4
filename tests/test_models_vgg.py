"""Classic VGG ("Very Deep Convolutional Networks for Large-Scale Image Recognition",
arXiv:1409.1556) against torchvision and the paper's arithmetic; the CIFAR-10 VGG of "Stable
Backpropagation in Deep Image Recognition: A VGGNet-Centered Analysis with Modern AI
Perspectives" (Meng et al.)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torchvision

from gradtrace.models import create_model
from gradtrace.models.vgg import VGG


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_params(channels: list[int]) -> int:
    """3x3 convs with bias along a chain of channel counts."""
    return sum(c_in * c_out * 9 + c_out for c_in, c_out in itertools.pairwise(channels))


@pytest.mark.parametrize(
    ("depth", "batch_norm", "torchvision_name"),
    [
        (11, False, "vgg11"),
        (13, False, "vgg13"),
        (16, False, "vgg16"),
        (19, False, "vgg19"),
        (11, True, "vgg11_bn"),
        (13, True, "vgg13_bn"),
        (16, True, "vgg16_bn"),
        (19, True, "vgg19_bn"),
    ],
)
def test_counts_and_output_shape_match_torchvision(
    depth: int, batch_norm: bool, torchvision_name: str
) -> None:
    with torch.device("meta"):
        ours = create_model(f"vgg{depth}", batch_norm=batch_norm)
        theirs = getattr(torchvision.models, torchvision_name)()
        x = torch.empty(2, 3, 224, 224)
        assert ours(x).shape == theirs(x).shape == (2, 1000)
    assert n_params(ours) == n_params(theirs)


def test_vgg16_counts_from_reference() -> None:
    with torch.device("meta"):
        assert n_params(create_model("vgg16")) == 138_357_544
        assert n_params(create_model("vgg16", batch_norm=True)) == 138_365_992


def test_vgg16_layout_and_names() -> None:
    with torch.device("meta"):
        model = create_model("vgg16")
    convs = [n for n, m in model.features.named_children() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [
        "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
        "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3",
    ]  # fmt: skip
    weights = [n for n, p in model.named_parameters() if n.endswith("weight")]
    assert weights[0] == "features.conv1_1.weight"
    assert weights[-3:] == [
        "classifier.fc6.weight",
        "classifier.fc7.weight",
        "classifier.fc8.weight",
    ]
    # Independent count: 13 convs, then 7x7x512 -> 4096 -> 4096 -> 1000.
    chain = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    fcs = (25088 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 1000 + 1000)
    assert n_params(model) == conv_params(chain) + fcs


def test_cifar_head() -> None:
    model = create_model("vgg16", head="cifar", num_classes=10)
    chain = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    head = (512 * 512 + 512) * 2 + 512 * 10 + 10
    assert n_params(model) == conv_params(chain) + head
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_invalid_depth() -> None:
    with pytest.raises(ValueError, match=r"depth must be one of 11, 13, 16, 19; got 12$"):
        VGG(depth=12)
    # The coursework network's depths (8 + 6b) belong to coursework_vgg: the message says so.
    with pytest.raises(ValueError) as info:
        create_model("vgg", depth=38)
    assert str(info.value) == (
        "the classic VGG's depth must be one of 11, 13, 16, 19; got 38 (Table 1's VGG38 is "
        "--model.arch coursework_vgg --model.depth 38)"
    )
    create_model("coursework_vgg", depth=38)  # what the message suggests is valid


def test_vgg_is_the_classic_family_by_depth() -> None:
    with torch.device("meta"):
        assert n_params(create_model("vgg", depth=16)) == 138_357_544
        assert n_params(create_model("vgg", depth=16, batch_norm=True)) == 138_365_992
        for depth in (11, 13, 19):
            assert n_params(create_model("vgg", depth=depth)) == n_params(
                create_model(f"vgg{depth}")
            )


def test_cifar10_vgg_layout() -> None:
    model = create_model("vgg_cifar10")
    assert [n for n, _ in model.named_children()] == [
        "block1", "block2", "block3", "pool", "dropout", "fc",
    ]  # fmt: skip
    assert [n for n, _ in model.block1.named_children()] == [
        "conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "pool",
    ]  # fmt: skip
    assert isinstance(model.block3.pool, torch.nn.MaxPool2d)
    assert isinstance(model.pool, torch.nn.AdaptiveAvgPool2d)
    assert model.dropout.p == 0.5
    # Convs without bias (BN follows), BN affine, linear head.
    convs = sum(a * b * 9 for a, b in [(3, 64), (64, 64), (64, 128), (128, 128)])
    convs += sum(a * b * 9 for a, b in [(128, 256), (256, 256)])
    bns = 2 * 2 * (64 + 128 + 256)
    assert n_params(model) == convs + bns + 256 * 10 + 10
    assert n_params(create_model("vgg_cifar10", convs_per_block=1)) == (
        3 * 64 * 9 + 64 * 128 * 9 + 128 * 256 * 9 + 2 * (64 + 128 + 256) + 2570
    )


def test_cifar10_vgg_he_init() -> None:
    torch.manual_seed(0)
    model = create_model("vgg_cifar10")
    weight = model.block2.conv2.weight  # fan_in = 128 * 9
    assert weight.std().item() == pytest.approx((2 / (128 * 9)) ** 0.5, rel=0.05)
    assert model.fc.weight.std().item() == pytest.approx((1 / 256) ** 0.5, rel=0.1)
    assert torch.count_nonzero(model.fc.bias) == 0
