"""Vision Transformer and Swin Transformer through timm, configured for 32x32 images.

The modern comparison that "Stable Backpropagation in Deep Image Recognition: A VGGNet-Centered
Analysis with Modern AI Perspectives" (Meng et al.) sets beside the CNNs: ViT ("An Image is
Worth 16x16 Words: Transformers for Image Recognition at Scale", arXiv:2010.11929) and Swin
("Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", arXiv:2103.14030).
timm builds the networks; we only pick configurations that make sense for CIFAR-sized inputs:

* ``vit_tiny_cifar`` / ``vit_small_cifar``: timm's ``vit_tiny_patch16_224`` /
  ``vit_small_patch16_224`` (ViT-Ti: 192 wide, 12 blocks, 3 heads; ViT-S: 384, 12, 6) with
  4x4 patches on 32x32 images, i.e. 64 tokens plus the class token.
* ``swin_tiny_cifar``: timm's ``swin_tiny_patch4_window7_224`` (96 wide, depths 2-2-6-2) with
  2x2 patches and 4x4 windows: stages at 16, 8, 4 and 2 tokens a side (timm shrinks the last
  stage's window to its 2x2 map and stops shifting there).

timm is imported only when one of these is built, so ``import gradtrace.models`` stays light.
No pretrained weights are fetched unless ``pretrained=True``; timm then downloads the ImageNet
weights of the base configuration from the Hugging Face Hub and resamples the patch embedding
and position embeddings to the CIFAR geometry.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gradtrace.models.registry import register_model

__all__ = ["VIT_CIFAR", "create_timm_model", "swin_tiny_cifar", "vit_cifar"]


def _check_options(img_size: int, patch_size: int, drop_path_rate: float, merges: int = 0) -> None:
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1); got {drop_path_rate}")
    if img_size < 1 or patch_size < 1:
        raise ValueError(f"img_size and patch_size must be >= 1; got {img_size}, {patch_size}")
    grid = img_size // patch_size
    if img_size % patch_size or grid % (2**merges):
        need = f"a multiple of {patch_size * 2**merges}" if merges else "a multiple of patch_size"
        raise ValueError(
            f"img_size must be {need} (patch_size={patch_size}"
            + (f", then {merges} 2x patch merges" if merges else "")
            + f"); got img_size={img_size}"
        )


def create_timm_model(
    timm_name: str, *, pretrained: bool, num_classes: int, in_chans: int, **kwargs: Any
) -> nn.Module:
    """``timm.create_model`` with a clear error when pretrained weights cannot be fetched.

    Raises:
        RuntimeError: ``pretrained=True`` and the weights are neither cached nor downloadable
            (no network, or ``HF_HUB_OFFLINE=1``); the original error is chained.
    """
    import timm  # deferred: timm is an optional dependency and slow to import

    try:
        return timm.create_model(
            timm_name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
        )
    except OSError as err:  # huggingface_hub's download and cache errors are OSErrors
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not fetch the pretrained weights of timm model {timm_name!r}: {err}\n"
            "To proceed: download them once on a machine with internet access (they are "
            "cached under ~/.cache/huggingface, or $HF_HOME) and make that cache available "
            "here, unsetting HF_HUB_OFFLINE if you set it; or build the model with "
            "pretrained=False to train from scratch."
        ) from err


# timm model -> (embedding size, attention heads), timm's own configurations.
_VIT_WIDTHS: dict[str, tuple[int, int]] = {
    "vit_tiny_patch16_224": (192, 3),
    "vit_small_patch16_224": (384, 6),
}


def vit_cifar(
    num_classes: int = 10,
    in_chans: int = 3,
    pretrained: bool = False,
    img_size: int = 32,
    patch_size: int = 4,
    drop_path_rate: float = 0.0,
    embed_dim: int | None = None,
    *,
    timm_name: str,
) -> nn.Module:
    """ViT with 4x4 patches for 32x32 images: timm's ``timm_name`` (fixed by each registered
    name, see :data:`VIT_CIFAR`) resized to the CIFAR geometry. ``embed_dim`` changes the
    embedding size (the MLPs follow it; default: timm's, 192 for ViT-Ti, 384 for ViT-S), a
    multiple of the attention heads (3 for ViT-Ti, 6 for ViT-S)."""
    _check_options(img_size, patch_size, drop_path_rate)
    default_dim, heads = _VIT_WIDTHS[timm_name]
    if embed_dim is not None:
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < heads:
            raise ValueError(f"embed_dim must be an integer >= {heads}; got {embed_dim!r}")
        if embed_dim % heads:
            raise ValueError(
                f"embed_dim must be a multiple of the {heads} attention heads of {timm_name}; "
                f"got {embed_dim}, nearest valid: {embed_dim - embed_dim % heads}, "
                f"{embed_dim - embed_dim % heads + heads}"
            )
        if pretrained and embed_dim != default_dim:
            raise ValueError(
                f"pretrained weights exist for embed_dim={default_dim} only; got {embed_dim}"
            )
    sizes = {} if embed_dim is None else {"embed_dim": embed_dim}
    return create_timm_model(
        timm_name,
        pretrained=pretrained,
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
        patch_size=patch_size,
        drop_path_rate=drop_path_rate,
        **sizes,
    )


VIT_CIFAR: dict[str, tuple[str, str]] = {
    "vit_tiny_cifar": ("vit_tiny_patch16_224", "ViT-Ti"),
    "vit_small_cifar": ("vit_small_patch16_224", "ViT-S"),
}
"""Registered ViT name -> (timm model, short name)."""

for _name, (_timm_name, _short) in VIT_CIFAR.items():
    register_model(
        _name,
        family="vit",
        input_size=(3, 32, 32),
        num_classes=10,
        timm_name=_timm_name,
        description=f"{_short} with 4x4 patches for 32x32 images (timm {_timm_name}).",
    )(vit_cifar)


@register_model(family="swin", input_size=(3, 32, 32), num_classes=10)
def swin_tiny_cifar(
    num_classes: int = 10,
    in_chans: int = 3,
    pretrained: bool = False,
    img_size: int = 32,
    patch_size: int = 2,
    window_size: int = 4,
    drop_path_rate: float = 0.1,
) -> nn.Module:
    """Swin-T with 2x2 patches and 4x4 windows for 32x32 images (timm swin_tiny_patch4_window7)."""
    _check_options(img_size, patch_size, drop_path_rate, merges=3)
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1; got {window_size}")
    return create_timm_model(
        "swin_tiny_patch4_window7_224",
        pretrained=pretrained,
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
        patch_size=patch_size,
        window_size=window_size,
        drop_path_rate=drop_path_rate,
    )
