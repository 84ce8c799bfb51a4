"""Every registered model: forward shapes, channels_last + bf16, compile, registry errors.

Shapes at 224/227 are checked per family: against torchvision for AlexNet, VGG and ResNet
(test_models_alexnet/vgg/resnet), GoogLeNet in its summary and in the slow test below.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gradtrace.models import AuxLogits, create_model, list_models, model_info

# What each family's ImageNet-sized models need for 32x32 inputs.
SMALL_INPUT_OPTIONS = {"head": "cifar", "stem": "cifar"}

ALL_MODELS = list_models()


def small_input_options(name: str) -> dict:
    options = model_info(name).options
    return {k: v for k, v in SMALL_INPUT_OPTIONS.items() if k in options}


def test_every_family_is_registered() -> None:
    expected = {
        "vgg08", "vgg38", "vgg11", "vgg13", "vgg16", "vgg19", "vgg_cifar10", "resnet_cifar",
        "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "plain20", "plain32",
        "plain44", "plain56", "plain110", "resnet18", "resnet34", "resnet50", "resnet101",
        "resnet152", "googlenet", "alexnet", "vit_tiny_cifar", "vit_small_cifar",
        "swin_tiny_cifar",
    }  # fmt: skip
    assert expected <= set(ALL_MODELS)
    families = {name: model_info(name).family for name in expected}
    assert families["vgg16"] == families["vgg_cifar10"] == "vgg"
    assert families["resnet56"] == families["plain56"] == "resnet_cifar"
    assert families["resnet50"] == "resnet"
    assert (families["vit_tiny_cifar"], families["swin_tiny_cifar"]) == ("vit", "swin")
    assert model_info("googlenet").input_size == (3, 224, 224)
    assert model_info("alexnet").input_size == (3, 227, 227)
    assert model_info("resnet20").num_classes == 10


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_32x32_channels_last_bf16(name: str) -> None:
    """Logits of shape (batch, num_classes) for 32x32 inputs with in_chans honoured."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_chans=1, **small_input_options(name)).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 7)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "size"), [("alexnet", 227), ("resnet50", 224), ("googlenet", 224)]
)
def test_real_forward_and_backward_at_imagenet_size(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5)
    out = model(torch.randn(2, 3, size, size))
    logits = out.logits if isinstance(out, AuxLogits) else out
    assert logits.shape == (2, 5)
    loss = logits.logsumexp(1).mean() + sum(a.logsumexp(1).mean() for a in getattr(out, "aux", ()))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
def test_torch_compile_representative_models() -> None:
    """Inductor compiles a CIFAR ResNet that matches eager; Dynamo captures GoogLeNet (training
    mode, aux heads) and a timm ViT as one graph each, i.e. without graph breaks.

    Inductor on CPU costs 15-30 s per model, so the other two stop at graph capture.
    """
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = create_model("resnet20").eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-3, atol=1e-3)

    model = create_model("googlenet", num_classes=10, stem="cifar")
    out = torch.compile(model, backend="eager", fullgraph=True)(x)
    assert isinstance(out, AuxLogits)
    assert [tuple(t.shape) for t in (out.logits, *out.aux)] == [(2, 10)] * 3
    (out.logits.sum() + 0.3 * sum(a.sum() for a in out.aux)).backward()
    assert model.aux1.fc2.weight.grad is not None

    model = create_model("vit_tiny_cifar")
    out = torch.compile(model, backend="eager", fullgraph=True)(x)
    assert out.shape == (2, 10)


@pytest.mark.integration
def test_import_does_not_load_timm_or_torchvision() -> None:
    code = (
        "import sys, gradtrace.models; "
        "print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_unknown_name_lists_the_closest() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet21'; closest: .*resnet20"):
        create_model("resnet21")
    with pytest.raises(ValueError, match="unknown model 'googlenet_v1'; closest: googlenet"):
        create_model("googlenet_v1")


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("alexnet", {"stem": "tiny"}, "stem must be one of imagenet, cifar; got 'tiny'"),
        ("googlenet", {"stem": "small"}, "stem must be one of imagenet, cifar; got 'small'"),
        ("vgg16", {"head": "mlp"}, "head must be one of imagenet, cifar; got 'mlp'"),
        ("vgg16", {"dropout": 1.0}, r"dropout must be in \[0, 1\); got 1.0"),
        ("googlenet", {"aux_dropout": -0.1}, r"aux_dropout must be in \[0, 1\); got -0.1"),
        ("vgg_cifar10", {"convs_per_block": 0}, "convs_per_block must be >= 1; got 0"),
        ("resnet_cifar", {"depth": 21}, "got 21, nearest valid: 20, 26"),
        ("resnet20", {"block": "basic"}, r"unknown option\(s\) \['block'\].*valid options: "),
        (
            "plain20",
            {"residual": True},
            r"'plain20' fixes \{'residual': False\}.*valid options for 'plain20': preact",
        ),
        ("resnet50", {"depth": 51}, r"'resnet50' fixes \{'depth': 50\}"),
    ],
)
def test_bad_options_name_the_valid_ones(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model(name, **options)
