"""ViT and Swin through timm: CIFAR geometry, options, and the offline pretrained error."""

from __future__ import annotations

import pytest
import torch

from gradtrace.models import create_model


def test_vit_tiny_geometry() -> None:
    model = create_model("vit_tiny_cifar")
    assert model.patch_embed.proj.kernel_size == (4, 4)
    assert model.pos_embed.shape == (1, 64 + 1, 192)  # 8x8 patches + class token
    assert len(model.blocks) == 12
    assert model.head.out_features == 10
    assert create_model("vit_tiny_cifar", patch_size=8).pos_embed.shape == (1, 16 + 1, 192)


def test_vit_small_width() -> None:
    model = create_model("vit_small_cifar", num_classes=100, in_chans=1)
    assert model.pos_embed.shape == (1, 65, 384)
    assert model.patch_embed.proj.in_channels == 1
    assert model.head.out_features == 100


def test_swin_tiny_geometry() -> None:
    model = create_model("swin_tiny_cifar")
    assert model.patch_embed.proj.kernel_size == (2, 2)
    assert [len(stage.blocks) for stage in model.layers] == [2, 2, 6, 2]
    assert [stage.blocks[0].window_size for stage in model.layers] == [(4, 4)] * 3 + [(2, 2)]
    # Shifted windows alternate in the stages that have more than one window.
    assert model.layers[0].blocks[1].shift_size == (2, 2)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("vit_tiny_cifar", {"patch_size": 5}, "img_size must be a multiple of patch_size"),
        ("vit_small_cifar", {"drop_path_rate": 1.5}, r"drop_path_rate must be in \[0, 1\)"),
        ("swin_tiny_cifar", {"patch_size": 8}, "img_size must be a multiple of 64"),
        ("swin_tiny_cifar", {"window_size": 0}, "window_size must be >= 1; got 0"),
    ],
)
def test_bad_options(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model(name, **options)


def test_no_weights_are_fetched_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    calls = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: calls.append(k) or real(*a, **k))
    create_model("vit_tiny_cifar")
    assert calls[0]["pretrained"] is False


def test_pretrained_offline_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; set both for any import order.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", "/nonexistent-gradtrace-test-cache")
    with pytest.raises(RuntimeError, match="could not fetch the pretrained weights") as info:
        create_model("vit_tiny_cifar", pretrained=True)
    message = str(info.value)
    assert "'vit_tiny_patch16_224'" in message
    assert "pretrained=False" in message
    assert "HF_HUB_OFFLINE" in message
    assert isinstance(info.value.__cause__, OSError)


def test_forward_backward() -> None:
    torch.manual_seed(0)
    model = create_model("swin_tiny_cifar", num_classes=10)
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert model.patch_embed.proj.weight.grad is not None
