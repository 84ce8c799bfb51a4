"""The data module's dataset options, checked and resolved at construction: the archive
checksum, the synthetic sizes, the image size, the classes and the default augmentation, each
with a message saying what is valid."""

from __future__ import annotations

from pathlib import Path

from gradtrace import data as ds
from gradtrace.checks import check_int

__all__ = [
    "check_md5",
    "check_synthetic_sizes",
    "default_augment",
    "resolve_classes",
    "resolve_image_size",
]


def default_augment(kind: str) -> str:
    """The training augmentation of dataset ``kind`` when none is asked for."""
    # Crop + flip is the coursework's CIFAR augmentation; for other data (handwriting, an
    # ImageFolder of unknown content) a flip can change the class, so nothing by default.
    return "crop_flip" if kind in ("cifar10", "cifar100") else "none"


def check_md5(md5: str | None, kind: str, dataset: str) -> None:
    """``md5`` is ``None`` or, for a CIFAR archive, 32 lowercase hex digits."""
    if md5 is None:
        return
    if kind not in ("cifar10", "cifar100"):
        raise ValueError(f"md5 only applies to cifar10 and cifar100; got dataset {dataset!r}")
    if not (isinstance(md5, str) and len(md5) == 32 and all(c in "0123456789abcdef" for c in md5)):
        raise ValueError(f"md5 must be 32 lowercase hex digits; got {md5!r}")


def check_synthetic_sizes(synthetic_sizes: tuple[int, int]) -> None:
    """``synthetic_sizes`` is two integers >= 1: the training pool and the test set."""
    if len(synthetic_sizes) != 2 or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in synthetic_sizes
    ):
        raise ValueError(
            f"synthetic_sizes must be two integers >= 1 (training pool, test); "
            f"got {synthetic_sizes!r}"
        )


def resolve_image_size(image_size: int | tuple[int, int] | None) -> tuple[int, int]:
    """``(H, W)`` of the images the model receives (default 32x32)."""
    if image_size is None:
        return (32, 32)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"image_size must be an integer or (H, W), each >= 1; got {image_size!r}")
    return size  # type: ignore[return-value]


def resolve_classes(
    kind: str, folder: Path | None, dataset: str, num_classes: int | None
) -> tuple[int, tuple[str, ...] | None]:
    """The class count and, where known before loading, the class names of ``dataset``.

    ``num_classes`` sizes synthetic data (default 10); for any other dataset the data sets it
    and a different value is an error. CIFAR's names come from its archive: ``None`` here.
    """
    if kind == "synthetic":
        check_int("num_classes", num_classes, 2, optional=True)
        return num_classes or 10, None
    if kind == "imagefolder":
        classes = tuple(ds.image_folder_classes(folder))
        count = len(classes)
        if count < 2:  # torchmetrics would fail later, inside the first validation
            raise ValueError(
                f"imagefolder path {folder} has one class folder ({classes[0]!r}); a classifier "
                "needs at least 2, one sub-folder per class"
            )
    else:
        classes = ds.FASHION_MNIST_CLASSES if kind == "fashion_mnist" else None
        count = 100 if kind == "cifar100" else 10
    if num_classes is not None and num_classes != count:
        raise ValueError(
            f"num_classes is set by the data for {dataset} ({count} classes); "
            f"leave it unset (it only sizes synthetic data); got {num_classes}"
        )
    return count, classes
