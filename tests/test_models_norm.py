"""``norm``/``norm_layer`` and ``activation``/``act_layer`` on the coursework VGG, the CIFAR
ResNets and the classic VGG: parameter counts, what each layer computes, one training step
for every combination, and the errors.

Group and layer normalisation are those of "Group Normalization" (arXiv:1803.08494) and
"Layer Normalization" (arXiv:1607.06450): a per-channel scale and shift like BatchNorm's
("Batch Normalization", arXiv:1502.03167), so swapping them keeps a model's parameter count.
"""

from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradtrace.classifier import ImageClassifier
from gradtrace.models import create_model
from gradtrace.models.layers import ACT_LAYERS, ACTIVATIONS, NORMS, LayerNorm2d, group_norm


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Table 1's counts (100 classes): VGG38 plain 336,196, with BN 338,500.
VGG38_PLAIN, VGG38_BN = 336_196, 338_500
# CIFAR ResNet-20 (10 classes), and its norm layers' channels counted independently:
# the stem's 16, then 3 blocks per stage of 2 norms each over widths 16, 32, 64.
RESNET20 = 269_722
RESNET20_NORM_CHANNELS = 16 + 3 * 2 * (16 + 32 + 64)
# VGG-11's eight convs: 64, 128, 256, 256, 512, 512, 512, 512 filters.
VGG11_NORM_CHANNELS = 64 + 128 + 256 * 2 + 512 * 4


@pytest.mark.parametrize("norm", ["batch", "group", "layer"])
def test_affine_norms_have_batch_norms_parameter_count(norm: str) -> None:
    assert n_params(create_model("vgg38", norm=norm)) == VGG38_BN
    assert n_params(create_model("resnet20", norm=norm)) == RESNET20
    with torch.device("meta"):
        plain = n_params(create_model("vgg", depth=11))
        assert n_params(create_model("vgg", depth=11, norm=norm)) == (
            plain + 2 * VGG11_NORM_CHANNELS
        )


def test_identity_norm_has_the_plain_count() -> None:
    assert n_params(create_model("vgg38", norm="none")) == VGG38_PLAIN
    assert n_params(create_model("vgg38", norm_layer=nn.Identity)) == VGG38_PLAIN
    assert n_params(create_model("resnet20", norm="none")) == (
        RESNET20 - 2 * RESNET20_NORM_CHANNELS
    )
    with torch.device("meta"):
        assert n_params(create_model("vgg", depth=11, norm="none")) == n_params(
            create_model("vgg11")
        )


def test_the_shorthands_build_the_same_network() -> None:
    def layout(model: nn.Module) -> list[tuple[str, str]]:
        return [(name, type(m).__name__) for name, m in model.named_modules()]

    assert layout(create_model("vgg38", batch_norm=True)) == layout(
        create_model("vgg38", norm="batch")
    )
    assert layout(create_model("vgg38")) == layout(create_model("vgg38", norm="none"))
    assert layout(create_model("vgg38", activation="tanh")) == layout(
        create_model("vgg38", act_layer=nn.Tanh)
    )
    with torch.device("meta"):
        assert layout(create_model("vgg16", batch_norm=True)) == layout(
            create_model("vgg", depth=16, norm_layer=nn.BatchNorm2d)
        )


def test_the_coursework_stem_keeps_its_batch_norm() -> None:
    # Cells of a normalisation study differ in the blocks only, as Table 1's variants do.
    model = create_model("vgg38", norm="group")
    assert type(model.stem[1]) is nn.BatchNorm2d
    block_norms = [m for m in model.stages.modules() if isinstance(m, nn.GroupNorm)]
    assert len(block_norms) == 36
    assert {m.num_groups for m in block_norms} == {8}


def test_layer_norm_2d_normalises_each_sample_over_channels_and_space() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 8, 5, 5) * 4 + 2
    norm = LayerNorm2d(8)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    var = x.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5)
    expected = expected * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(norm(x), expected)


def test_group_norm_normalises_groups_of_channels() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 4, 4) * 3 - 1
    out = group_norm(16)(x)  # 8 groups of 2 channels, affine at its identity start
    groups = x.view(2, 8, 2 * 4 * 4)
    expected = (groups - groups.mean(-1, keepdim=True)) / torch.sqrt(
        groups.var(-1, unbiased=False, keepdim=True) + 1e-5
    )
    torch.testing.assert_close(out, expected.view_as(x))


MODELS = {
    # name -> (options, input size): small widths and depths, one step each.
    "coursework_vgg": ({"depth": 8, "width": 8}, 16),
    "resnet_cifar": ({"depth": 8}, 16),
    "vgg": ({"depth": 11, "head": "cifar", "dropout": 0.0}, 32),
}
NORM_TYPES = {"batch": nn.BatchNorm2d, "group": nn.GroupNorm, "layer": LayerNorm2d}


def train_one_step(name: str, norm: str, activation: str) -> nn.Module:
    options, size = MODELS[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, norm=norm, activation=activation, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    for p in model.parameters():
        assert p.grad is not None
        assert torch.isfinite(p.grad).all()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad.abs().sum() > 0  # the gradient reaches the input layer
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return model


ACT_TYPES = (nn.LeakyReLU, nn.ReLU, nn.ELU, nn.SELU, nn.Sigmoid, nn.Tanh)


def layer_types(model: nn.Module, types: tuple[type, ...]) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, types)}


# Every combination on the cheapest network; each norm and each activation on the others.
COMBINATIONS = [("coursework_vgg", n, a) for n, a in itertools.product(NORMS, ACTIVATIONS)]
COMBINATIONS += [("resnet_cifar", n, "relu") for n in NORMS]
COMBINATIONS += [("resnet_cifar", "batch", a) for a in ACTIVATIONS if a != "relu"]


@pytest.mark.parametrize(("name", "norm", "activation"), COMBINATIONS)
def test_every_norm_and_activation_trains_one_step(name: str, norm: str, activation: str) -> None:
    model = train_one_step(name, norm, activation)
    assert layer_types(model, ACT_TYPES) == {type(ACT_LAYERS[activation]())}
    norms = layer_types(model, (nn.BatchNorm2d, nn.GroupNorm))
    stem = {nn.BatchNorm2d} if name == "coursework_vgg" else set()
    assert norms == stem | ({NORM_TYPES[norm]} if norm != "none" else set())


@pytest.mark.parametrize(
    ("norm", "activation"),
    # VGG-11 is the costly one (9M conv weights): each norm once, with varied activations.
    [("none", "relu"), ("batch", "tanh"), ("group", "leaky_relu"), ("layer", "elu")],
)
def test_classic_vgg_norms_and_activations_train_one_step(norm: str, activation: str) -> None:
    model = train_one_step("vgg", norm, activation)
    assert layer_types(model, ACT_TYPES) == {type(ACT_LAYERS[activation]())}
    expected = {NORM_TYPES[norm]} if norm != "none" else set()
    assert layer_types(model, (nn.BatchNorm2d, nn.GroupNorm)) == expected


def test_factories_are_accepted_and_init_uses_the_activations_gain() -> None:
    torch.manual_seed(0)
    model = create_model(
        "vgg38", init="kaiming", act_layer=partial(nn.LeakyReLU, 0.2),
        norm_layer=partial(group_norm, num_groups=4),
    )  # fmt: skip
    assert model.stages[0].blocks[0].bn1.num_groups == 4
    weight = model.stages[0].blocks[0].conv1.weight  # fan_in = 32 * 9
    assert weight.std().item() == pytest.approx((2 / (1 + 0.2**2) / (32 * 9)) ** 0.5, rel=0.05)
    # An activation without a known gain is fine with PyTorch's own initialisation only.
    assert create_model("vgg08", act_layer=nn.GELU)(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    with pytest.raises(ValueError, match=r"init='kaiming' needs the gain.*got GELU"):
        create_model("vgg08", act_layer=nn.GELU, init="kaiming")


def test_the_classifier_and_the_cli_name_the_norm() -> None:
    module = ImageClassifier(arch="vgg38", norm="layer", residual=True, activation="elu")
    assert layer_types(module.net.stages, (nn.BatchNorm2d, nn.GroupNorm)) == {LayerNorm2d}
    assert layer_types(module.net, ACT_TYPES) == {nn.ELU}


def test_bad_norm_options_say_what_is_valid() -> None:
    with pytest.raises(ValueError, match="norm must be one of batch, group, layer, none; got 'in"):
        create_model("vgg38", norm="instance")
    with pytest.raises(ValueError, match="give the normalisation once; got norm='group' and bat"):
        create_model("vgg38", norm="group", batch_norm=True)
    with pytest.raises(ValueError, match="give the normalisation once; got norm='batch' and norm_"):
        create_model("resnet20", norm="batch", norm_layer=nn.BatchNorm2d)
    with pytest.raises(ValueError, match="give the activation once; got activation='relu' and a"):
        create_model("vgg", activation="relu", act_layer=nn.ReLU)
    with pytest.raises(ValueError, match="8 groups needs a channel count divisible by 8; got 12"):
        create_model("vgg08", width=12, norm="group")
