"""The Table 1 network of the MLP Coursework 2 report: exact parameter counts, layout, options
and the vanishing-gradient fact.

The counts are those of the original coursework code (``ConvolutionalNetwork`` in
``pytorch_mlp_framework/model_architectures.py``, VICO-UoE/mlpractical) built with 100 classes;
the report's Table 1 rounds them to 60 K, 336 K and 339 K.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradtrace.models import create_model, list_models, model_info
from gradtrace.models.coursework_vgg import valid_depth


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("vgg08", {}, 59_716),
        ("vgg38", {}, 336_196),
        ("vgg38", {"batch_norm": True}, 338_500),
        ("vgg38", {"residual": True}, 336_196),
        ("vgg38", {"batch_norm": True, "residual": True}, 338_500),
        ("coursework_vgg", {"depth": 8}, 59_716),
        ("coursework_vgg", {"depth": 38, "norm": "batch"}, 338_500),
    ],
)
def test_parameter_counts_match_table1(name: str, options: dict, expected: int) -> None:
    assert n_params(create_model(name, num_classes=100, **options)) == expected


def test_parameter_count_from_the_layout() -> None:
    # Independent arithmetic: stem conv + BN, 6 reduction convs with bias, 30 processing
    # convs without bias, linear head; BN adds (gamma, beta) per conv.
    conv = 32 * 32 * 9
    stem = 3 * 32 * 9 + 2 * 32
    reductions = 6 * (conv + 32)
    processing = 30 * conv
    head = 32 * 100 + 100
    assert n_params(create_model("vgg38")) == stem + reductions + processing + head
    assert n_params(create_model("vgg38", batch_norm=True)) == (
        stem + reductions + processing + head + 36 * 2 * 32
    )


def test_depth_counts_weight_layers() -> None:
    for depth in (8, 14, 20, 38, 56, 110):
        model = create_model("coursework_vgg", depth=depth)
        weights = [p for p in model.parameters() if p.ndim > 1]
        assert len(weights) == depth


@pytest.mark.parametrize(("depth", "nearest"), [(37, "32, 38"), (5, "8"), (9, "8, 14")])
def test_invalid_depth_names_the_nearest_valid_ones(depth: int, nearest: str) -> None:
    with pytest.raises(ValueError, match=f"got {depth}, nearest valid: {nearest}$"):
        valid_depth(depth)


def test_downsample_shortcuts() -> None:
    x = torch.randn(2, 3, 32, 32)
    base = n_params(create_model("vgg38", residual=True))
    conv1x1 = create_model("vgg38", residual=True, downsample_shortcut="conv1x1")
    avgpool = create_model("vgg38", residual=True, downsample_shortcut="avgpool")
    assert n_params(conv1x1) == base + 3 * 32 * 32
    assert n_params(avgpool) == base
    assert conv1x1(x).shape == avgpool(x).shape == (2, 100)
    with pytest.raises(ValueError, match="needs residual=True"):
        create_model("vgg38", downsample_shortcut="avgpool")
    with pytest.raises(ValueError, match="downsample_shortcut must be one of none, conv1x1"):
        create_model("vgg38", residual=True, downsample_shortcut="maxpool")


def test_residual_block_adds_its_input() -> None:
    model = create_model("vgg38", residual=True, activation="relu")
    block = model.stages[0].blocks[0]
    for conv in (block.conv1, block.conv2):
        torch.nn.init.zeros_(conv.weight)
    x = torch.rand(1, 32, 8, 8)  # non-negative, so relu(0 + x) == x
    torch.testing.assert_close(block(x), x)


@pytest.mark.parametrize("activation", ["leaky_relu", "relu", "elu", "selu", "sigmoid", "tanh"])
@pytest.mark.parametrize("init", ["pytorch", "kaiming", "xavier"])
def test_activations_and_inits_build_and_run(activation: str, init: str) -> None:
    torch.manual_seed(0)
    model = create_model("vgg08", activation=activation, init=init, num_classes=10)
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()


def test_kaiming_init_sets_fan_in_std() -> None:
    torch.manual_seed(0)
    model = create_model("vgg38", init="kaiming", activation="relu")
    weight = model.stages[0].blocks[0].conv1.weight
    assert weight.std().item() == pytest.approx((2 / (32 * 9)) ** 0.5, rel=0.05)
    assert torch.count_nonzero(model.stages[0].reduction.conv1.bias) == 0


def test_bad_options_name_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="activation must be one of leaky_relu, relu"):
        create_model("vgg08", activation="gelu")
    with pytest.raises(ValueError, match="init must be one of pytorch, kaiming, xavier"):
        create_model("vgg08", init="orthogonal")
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) \['dropout'\].*valid options: depth"
    ):
        create_model("coursework_vgg", dropout=0.5)
    with pytest.raises(ValueError, match=r"'vgg38' fixes \{'depth': 38\}"):
        create_model("vgg38", depth=8)


def test_unknown_name_lists_the_closest() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg37'; closest: vgg38"):
        create_model("vgg37")


def test_registry_lists_aliases() -> None:
    assert {"vgg08", "vgg38"} <= set(list_models(family="coursework_vgg"))
    assert list_models("coursework*") == ["coursework_vgg"]
    assert model_info("vgg").family == "vgg"  # the classic VGG-11/13/16/19
    assert model_info("vgg38").fixed == {"depth": 38}
    assert model_info("vgg38").num_classes == 100


def first_last_ratio(model: torch.nn.Module) -> float:
    torch.manual_seed(1)
    x, y = torch.randn(100, 3, 32, 32), torch.randint(0, 100, (100,))
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.abs().mean().item() for p in model.parameters() if p.ndim > 1]
    return grads[0] / grads[-1]


def test_plain_vgg38_gradients_vanish_at_init_and_batch_norm_fixes_it() -> None:
    torch.manual_seed(0)
    assert first_last_ratio(create_model("vgg38")) < 1e-5
    torch.manual_seed(0)
    assert first_last_ratio(create_model("vgg38", batch_norm=True)) > 1e-2
    torch.manual_seed(0)
    assert first_last_ratio(create_model("vgg08")) > 1e-3


def original_forward(model: torch.nn.Module, x: torch.Tensor, blocks: int) -> torch.Tensor:
    """The original coursework code's forward pass (``ConvolutionalNetwork.forward``, VICO-UoE/
    mlpractical ``pytorch_mlp_framework``), with torch.nn.functional on ``model``'s parameters
    taken in registration order: entry conv -> BN (batch statistics) -> leaky_relu; per stage
    ``blocks`` x (conv, leaky_relu, conv, leaky_relu), then conv -> leaky_relu -> avg_pool 2 ->
    conv -> leaky_relu (convs with bias); avg_pool over the whole map; linear."""
    params = iter(model.parameters())

    def conv(out: torch.Tensor, bias: bool) -> torch.Tensor:
        weight = next(params)
        return F.conv2d(out, weight, next(params) if bias else None, padding=1)

    out = conv(x, bias=False)
    out = F.leaky_relu(F.batch_norm(out, None, None, next(params), next(params), training=True))
    for _ in range(3):
        for _ in range(blocks):
            out = F.leaky_relu(conv(F.leaky_relu(conv(out, bias=False)), bias=False))
        out = F.avg_pool2d(F.leaky_relu(conv(out, bias=True)), 2)
        out = F.leaky_relu(conv(out, bias=True))
    out = F.avg_pool2d(out, out.shape[-1]).flatten(1)
    return F.linear(out, next(params), next(params))


@pytest.mark.parametrize(("name", "blocks"), [("vgg08", 0), ("vgg38", 5)])
def test_defaults_match_the_original_coursework_network_output_for_output(
    name: str, blocks: int
) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.randn(4, 3, 32, 32)
    expected = original_forward(model, x, blocks)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
