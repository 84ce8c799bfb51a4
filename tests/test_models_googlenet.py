"""GoogLeNet: the paper's filter table, true 5x5 branches, aux heads, BN and CIFAR stem."""

from __future__ import annotations

import itertools

import pytest
import torch

from gradtrace.models import AuxLogits, create_model
from gradtrace.models.googlenet import Inception

# "Going Deeper with Convolutions" (arXiv:1409.4842), Table 1, typed in again (not imported)
# so the test is independent:
# name, input channels, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
PAPER = [
    ("3a", 192, 64, 96, 128, 16, 32, 32),
    ("3b", 256, 128, 128, 192, 32, 96, 64),
    ("4a", 480, 192, 96, 208, 16, 48, 64),
    ("4b", 512, 160, 112, 224, 24, 64, 64),
    ("4c", 512, 128, 128, 256, 24, 64, 64),
    ("4d", 512, 112, 144, 288, 32, 64, 64),
    ("4e", 528, 256, 160, 320, 32, 128, 128),
    ("5a", 832, 256, 160, 320, 32, 128, 128),
    ("5b", 832, 384, 192, 384, 48, 128, 128),
]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def module_weights(c_in: int, c1: int, r3: int, c3: int, r5: int, c5: int, pp: int) -> int:
    return c_in * c1 + c_in * r3 + r3 * c3 * 9 + c_in * r5 + r5 * c5 * 25 + c_in * pp


def test_the_table_chains() -> None:
    """Each module's output (1x1 + 3x3 + 5x5 + pool proj) is the next module's input."""
    for (_, _, c1, _, c3, _, c5, pp), (_, c_in, *_) in itertools.pairwise(PAPER):
        assert c1 + c3 + c5 + pp == c_in


@pytest.fixture(scope="module")
def googlenet() -> torch.nn.Module:
    return create_model("googlenet")


@pytest.mark.parametrize("row", PAPER, ids=[r[0] for r in PAPER])
def test_inception_module_weights_from_the_filter_table(
    googlenet: torch.nn.Module, row: tuple
) -> None:
    name, c_in, c1, r3, c3, r5, c5, pp = row
    module = getattr(googlenet, f"inception{name}")
    weights = sum(p.numel() for n, p in module.named_parameters() if n.endswith("weight"))
    biases = sum(p.numel() for n, p in module.named_parameters() if n.endswith("bias"))
    assert weights == module_weights(c_in, c1, r3, c3, r5, c5, pp)
    assert biases == c1 + r3 + c3 + r5 + c5 + pp
    # True 5x5 convolutions in the third branch (torchvision uses 3x3 there).
    assert module.branch3.conv5x5.conv.kernel_size == (5, 5)
    assert module(torch.randn(1, c_in, 7, 7)).shape == (1, c1 + c3 + c5 + pp, 7, 7)


def test_total_count_from_the_table() -> None:
    stem = (3 * 64 * 49 + 64) + (64 * 64 + 64) + (64 * 192 * 9 + 192)
    assert stem == 124_416  # the lecture's "124K"
    modules = sum(module_weights(*r[1:]) + sum(r[2:]) for r in PAPER)
    head = 1024 * 1000 + 1000

    def aux(c_in: int) -> int:
        return (c_in * 128 + 128) + (2048 * 1024 + 1024) + (1024 * 1000 + 1000)

    assert n_params(create_model("googlenet", aux_logits=False)) == stem + modules + head
    assert n_params(create_model("googlenet")) == stem + modules + head + aux(512) + aux(528)


def test_batch_norm_variant() -> None:
    plain = create_model("googlenet", aux_logits=False)
    bn = create_model("googlenet", aux_logits=False, batch_norm=True)
    convs = [m for m in plain.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 + 9 * 6
    # Each conv loses its bias and gains a BN (gamma and beta): + one bias' worth each.
    assert n_params(bn) == n_params(plain) + sum(c.out_channels for c in convs)
    assert isinstance(bn.inception3a.branch1.bn, torch.nn.BatchNorm2d)
    assert bn.inception3a.branch1.conv.bias is None


def test_aux_heads_in_training_and_eval() -> None:
    torch.manual_seed(0)
    model = create_model("googlenet", num_classes=10, stem="cifar")
    aux = model.aux1
    assert (aux.pool.kernel_size, aux.pool.stride) == (5, 3)
    assert aux.conv.conv.out_channels == 128
    assert (aux.fc1.in_features, aux.fc1.out_features) == (2048, 1024)
    assert aux.dropout.p == 0.7
    assert model.dropout.p == 0.4
    x = torch.randn(2, 3, 32, 32)
    out = model.train()(x)
    assert isinstance(out, AuxLogits)
    assert out.logits.shape == (2, 10)
    assert [a.shape for a in out.aux] == [(2, 10), (2, 10)]
    logits = model.eval()(x)
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (2, 10)
    no_aux = create_model("googlenet", num_classes=10, stem="cifar", aux_logits=False)
    assert isinstance(no_aux.train()(x), torch.Tensor)
    assert no_aux.aux1 is None
    assert no_aux.aux2 is None


def test_module_order_follows_the_data(googlenet: torch.nn.Module) -> None:
    names = [n for n, _ in googlenet.named_children()]
    assert names == [
        "stem", "inception3a", "inception3b", "maxpool3", "inception4a", "aux1",
        "inception4b", "inception4c", "inception4d", "aux2", "inception4e", "maxpool4",
        "inception5a", "inception5b", "avgpool", "dropout", "fc",
    ]  # fmt: skip
    assert [n for n, _ in googlenet.stem.named_children()] == [
        "conv1", "pool1", "conv2", "conv3", "pool2",
    ]  # fmt: skip


def test_stems_reach_inception_3a_at_the_expected_size() -> None:
    with torch.device("meta"):
        imagenet = create_model("googlenet").stem
        assert imagenet(torch.empty(1, 3, 224, 224)).shape == (1, 192, 28, 28)
    cifar = create_model("googlenet", stem="cifar").stem
    assert cifar(torch.randn(1, 3, 32, 32)).shape == (1, 192, 32, 32)


def test_caffe_initialisation_without_batch_norm(googlenet: torch.nn.Module) -> None:
    model = googlenet
    conv = model.inception4a.branch2.conv3x3.conv  # fan_in = 96 * 9
    assert conv.weight.std().item() == pytest.approx((1 / (96 * 9)) ** 0.5, rel=0.05)
    assert torch.all(conv.bias == 0.2)
    assert torch.all(model.fc.bias == 0)
    assert torch.all(model.aux1.fc2.bias == 0)
    assert torch.all(model.aux1.fc1.bias == 0.2)


def test_aux_heads_reject_other_input_sizes() -> None:
    model = create_model("googlenet", num_classes=10, stem="cifar")
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"got a 32x32 map. aux_logits=False takes other sizes"):
        model.train()(x)
    assert model.eval()(x).shape == (1, 10)
    # The ImageNet stem on 32x32 images: the check comes before the pooling that would fail.
    imagenet_stem = create_model("googlenet", num_classes=10)
    with pytest.raises(ValueError, match=r"got a 2x2 map"):
        imagenet_stem.train()(torch.randn(2, 3, 32, 32))


def test_inception_is_reusable_on_its_own() -> None:
    module = Inception(16, 4, 4, 8, 2, 4, 4, batch_norm=True)
    assert module(torch.randn(2, 16, 5, 5)).shape == (2, 20, 5, 5)
