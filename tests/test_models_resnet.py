"""ResNets: CIFAR counts from the paper, option-A shortcuts, plain twins, pre-activation,
ImageNet counts and shapes against torchvision."""

from __future__ import annotations

import pytest
import torch
import torchvision

from gradtrace.models import create_model
from gradtrace.models.resnet import ResNet, cifar_blocks
from gradtrace.models.resnet_blocks import (
    BasicBlock,
    PreActBasicBlock,
    PreActBottleneck,
    ZeroPadShortcut,
)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


CIFAR_COUNTS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}


def cifar_count(n: int, classes: int = 10) -> int:
    """Independent arithmetic: stem conv + BN, 3 stages of n blocks (2 convs + 2 BN), head."""
    total = 3 * 16 * 9 + 2 * 16
    c_in = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += c_in * width * 9 + width * width * 9 + 4 * width
            c_in = width
    return total + 64 * classes + classes


@pytest.mark.parametrize("depth", sorted(CIFAR_COUNTS))
def test_cifar_counts_match_the_paper(depth: int) -> None:
    n = (depth - 2) // 6
    assert cifar_count(n) == CIFAR_COUNTS[depth]
    assert n_params(create_model(f"resnet{depth}")) == CIFAR_COUNTS[depth]
    # Option-A shortcuts hold no parameters, so the plain twins have exactly as many.
    assert n_params(create_model(f"plain{depth}")) == CIFAR_COUNTS[depth]


def test_cifar_depth_counts_weight_layers() -> None:
    for depth in (20, 56):
        model = create_model("resnet_cifar", depth=depth)
        assert sum(1 for p in model.parameters() if p.ndim > 1) == depth
        assert len(model.layer1) == len(model.layer2) == len(model.layer3) == (depth - 2) // 6


@pytest.mark.parametrize(("depth", "nearest"), [(21, "20, 26"), (7, "8"), (100, "98, 104")])
def test_cifar_depth_errors_name_the_nearest(depth: int, nearest: str) -> None:
    with pytest.raises(ValueError, match=rf"6n\+2 .*got {depth}, nearest valid: {nearest}$"):
        cifar_blocks(depth)


def test_zero_pad_shortcut_subsamples_and_pads() -> None:
    x = torch.randn(2, 16, 8, 8)
    out = ZeroPadShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, 16:]) == 0


def test_residual_and_plain_blocks() -> None:
    """With zeroed convs a residual block passes relu(x) through; a plain block outputs 0."""
    model = create_model("resnet20").eval()
    plain = create_model("plain20").eval()
    x = torch.randn(1, 16, 8, 8)
    for m in (model, plain):
        for conv in (m.layer1[0].conv1, m.layer1[0].conv2):
            torch.nn.init.zeros_(conv.weight)
    torch.testing.assert_close(model.layer1[0](x), torch.relu(x))
    assert torch.count_nonzero(plain.layer1[0](x)) == 0
    assert isinstance(model.layer2[0].shortcut, ZeroPadShortcut)
    assert plain.layer2[0].shortcut is None


def test_preact_blocks() -> None:
    model = create_model("resnet56", preact=True)
    assert isinstance(model.layer1[0], PreActBasicBlock)
    block = model.layer2[0]
    # BN-ReLU come first, on the block's input width.
    assert [n for n, _ in block.named_children()][:3] == ["bn1", "relu1", "conv1"]
    assert block.bn1.num_features == 16
    # No BN-ReLU after the stem, one before the pooling.
    assert isinstance(model.bn1, torch.nn.Identity)
    assert model.final_bn.num_features == 64
    # Count: the stem BN (32) moves to the end (128); the first blocks of stages 2 and 3
    # normalise their 16/32-channel inputs instead of 32/64-channel outputs (-32, -64).
    assert n_params(model) == CIFAR_COUNTS[56] - 32 + 128 - 32 - 64
    # With zeroed convs a pre-activation block is the identity: nothing after the addition.
    x = torch.randn(1, 16, 8, 8)
    first = model.layer1[0].eval()
    for conv in (first.conv1, first.conv2):
        torch.nn.init.zeros_(conv.weight)
    torch.testing.assert_close(first(x), x)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_imagenet_preact_bottleneck_projection_sees_preactivated_input() -> None:
    with torch.device("meta"):
        model = create_model("resnet50", preact=True)
    block = model.layer2[0]
    assert isinstance(block, PreActBottleneck)
    assert block.project
    assert isinstance(block.shortcut, torch.nn.Sequential)
    torch.manual_seed(0)
    block = PreActBottleneck(64, 16, stride=2, shortcut="project").eval()
    x = torch.randn(1, 64, 8, 8)
    for conv in (block.conv1, block.conv2, block.conv3):
        torch.nn.init.zeros_(conv.weight)
    torch.testing.assert_close(block(x), block.shortcut(block.relu1(block.bn1(x))))


IMAGENET_COUNTS = {
    18: 11_689_512,
    34: 21_797_672,
    50: 25_557_032,
    101: 44_549_160,
    152: 60_192_808,
}


@pytest.mark.parametrize("depth", sorted(IMAGENET_COUNTS))
def test_imagenet_counts_and_shapes_match_torchvision(depth: int) -> None:
    with torch.device("meta"):
        ours = create_model(f"resnet{depth}")
        theirs = getattr(torchvision.models, f"resnet{depth}")()
        x = torch.empty(2, 3, 224, 224)
        assert ours(x).shape == theirs(x).shape == (2, 1000)
    assert n_params(ours) == n_params(theirs) == IMAGENET_COUNTS[depth]
    # Same weights in the same order, under the same names up to the block internals.
    ours_shapes = [tuple(p.shape) for p in ours.parameters()]
    theirs_shapes = [tuple(p.shape) for p in theirs.parameters()]
    assert ours_shapes == theirs_shapes


def test_imagenet_plain_drops_projections() -> None:
    with torch.device("meta"):
        plain = create_model("resnet18", residual=False)
    projections = 64 * 128 + 128 * 256 + 256 * 512 + 2 * (128 + 256 + 512)
    assert n_params(plain) == IMAGENET_COUNTS[18] - projections
    assert all(block.shortcut is None for block in plain.layer2)
    assert isinstance(create_model("resnet18").layer1[0], BasicBlock)


def test_resnet_class_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="block must be one of basic, bottleneck; got 'wide'"):
        ResNet("wide", (1,), (16,), stem="cifar", downsample="zeropad")
    with pytest.raises(ValueError, match="one positive entry per stage"):
        ResNet("basic", (1, 1), (16,), stem="cifar", downsample="zeropad")
