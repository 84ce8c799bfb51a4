"""The data module's splits: checking their sizes, reading the source, cutting train, validation
and test from it, and conforming the images to the shape the model expects.

Every cut is a seeded class-balanced split (:func:`gradtrace.data.class_balanced_split`), so the
validation split, a flat ImageFolder's test split and the training subset are pure functions of
the seed.
"""

from __future__ import annotations

from pathlib import Path

from gradtrace import data as ds

__all__ = [
    "CIFAR_TRAIN_SIZE",
    "carve_splits",
    "check_files_present",
    "check_split_sizes",
    "conform",
    "is_flat_image_folder",
    "known_pool_size",
    "read_source",
    "training_subset",
]

CIFAR_TRAIN_SIZE = 50_000  # images in the official CIFAR-10 and CIFAR-100 training archives


def is_flat_image_folder(kind: str, folder: Path | None) -> bool:
    """An ImageFolder tree without ``train/``: test and validation are carved from it."""
    return kind == "imagefolder" and folder is not None and not (folder / "train").is_dir()


def check_files_present(kind: str, root: str, md5: str | None) -> None:
    """Fail with :class:`~gradtrace.data.DataNotFoundError` when a CIFAR archive or
    Fashion-MNIST is not under ``root`` (for runs that may not download it)."""
    if kind in ("cifar10", "cifar100"):
        archive = ds.cifar_archive(kind)
        path = Path(root) / archive.filename
        if not path.is_file():
            raise ds.DataNotFoundError(ds.cifar_missing_message(archive, path, md5 or archive.md5))
    elif kind == "fashion_mnist" and ds.find_fashion_mnist(root) is None:
        raise ds.DataNotFoundError(ds.fashion_mnist_missing_message(root))


def known_pool_size(
    kind: str, root: str, md5: str | None, synthetic_sizes: tuple[int, int]
) -> int | None:
    """Training-pool size when it is cheap to know before loading, else None."""
    if kind == "synthetic":
        return synthetic_sizes[0]
    if kind in ("cifar10", "cifar100") and md5 is None:
        return CIFAR_TRAIN_SIZE  # the published checksum pins the content
    if kind == "fashion_mnist":
        return ds.fashion_mnist_train_size(root)
    return None


def check_split_sizes(
    dataset: str,
    pool: int,
    *,
    global_batch: int,
    val_size: int,
    carved_test: int,
    subset: int | None,
) -> None:
    """Fail with the valid range when the splits do not fit ``pool`` training images.

    ``val_size`` and ``carved_test`` are what is carved from the pool (0 where the source has
    its own split); one global batch must remain for training, and ``subset`` must lie between
    that batch and the training split.
    """
    if pool - carved_test - val_size < global_batch:
        test_note = f" after the test split of {carved_test}" if carved_test else ""
        raise ValueError(
            f"val_size must be at most {max(pool - carved_test - global_batch, 0)} for "
            f"{dataset}: it has {pool} training images{test_note} and one global batch "
            f"({global_batch}) must remain for training; got val_size={val_size}"
        )
    train = pool - carved_test - val_size
    if subset is not None and not global_batch <= subset <= train:
        raise ValueError(
            f"subset must be between {global_batch} (one global batch) and {train} (the "
            f"training split of {dataset}); got {subset}"
        )


def read_source(
    kind: str,
    folder: Path | None,
    root: str,
    *,
    md5: str | None,
    download: bool,
    num_classes: int,
    channels: int,
    size: tuple[int, int],
    synthetic_sizes: tuple[int, int],
) -> ds.ImageData:
    """Read the whole dataset ``kind`` into memory."""
    if kind in ("cifar10", "cifar100"):
        return ds.read_cifar(kind, root, md5, download)
    if kind == "fashion_mnist":
        return ds.read_fashion_mnist(root, download)
    if kind == "synthetic":
        return ds.read_synthetic(num_classes, channels, size, synthetic_sizes)
    assert folder is not None
    return ds.read_image_folder(folder, channels, size)


def conform(split: ds.Split, channels: int, size: tuple[int, int]) -> ds.Split:
    """Convert channels and resize to what the model expects (torchvision only if needed)."""
    images, labels = split
    if images.shape[1] == 1 and channels == 3:
        images = images.repeat(1, 3, 1, 1)
    elif images.shape[1] == 3 and channels == 1:
        from torchvision.transforms.v2.functional import rgb_to_grayscale

        images = rgb_to_grayscale(images)
    if tuple(images.shape[2:]) != size:
        from torchvision.transforms.v2.functional import resize

        images = resize(images, list(size), antialias=True)
    return images, labels


def _carve(split: ds.Split, size: int, seed: int, num_classes: int) -> tuple[ds.Split, ds.Split]:
    """``(chosen, rest)``: ``size`` images of ``split``, class-balanced, and the others."""
    images, labels = split
    chosen, rest = ds.class_balanced_split(labels, size, seed, num_classes)
    return (images[chosen], labels[chosen]), (images[rest], labels[rest])


def carve_splits(
    pool: ds.Split,
    val: ds.Split | None,
    test: ds.Split | None,
    *,
    val_size: int,
    carved_test: int | None,
    seed: int,
    num_classes: int,
) -> tuple[ds.Split, ds.Split, ds.Split]:
    """``(train, val, test)`` from the training ``pool`` and the source's own splits.

    A missing test split is carved from the pool first when ``carved_test`` gives its size (a
    flat ImageFolder tree), else it is empty (``train/`` without ``test/``); a missing
    validation split of ``val_size`` images is carved from what remains.
    """
    if test is None and carved_test is not None:
        test, pool = _carve(pool, carved_test, ds.derive_seed("test", seed), num_classes)
    elif test is None:
        images, labels = pool
        test = (images[:0], labels[:0])
    if val is None:
        val, pool = _carve(pool, val_size, ds.derive_seed("val", seed), num_classes)
    return pool, val, test


def training_subset(train: ds.Split, subset: int, seed: int, num_classes: int) -> ds.Split:
    """A seeded class-balanced subset of ``subset`` training images."""
    images, labels = train
    chosen, _ = ds.class_balanced_split(labels, subset, ds.derive_seed("subset", seed), num_classes)
    return images[chosen], labels[chosen]
