"""What every dataset source returns (:class:`ImageData`), the ``dataset`` argument's values,
the seeded class-balanced split, and the errors a user can fix by providing data."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from gradtrace.checks import check_choice

__all__ = [
    "DATASETS",
    "ChecksumError",
    "DataNotFoundError",
    "ImageData",
    "Split",
    "class_balanced_split",
    "derive_seed",
    "parse_dataset",
]

#: Valid values of the data module's ``dataset`` argument.
DATASETS = ("cifar10", "cifar100", "fashion_mnist", "synthetic", "imagefolder:<path>")

Split = tuple[torch.Tensor, torch.Tensor]


class DataNotFoundError(FileNotFoundError):
    """The dataset is in none of the places searched and could not be downloaded.

    The message is one line listing the ways to provide it; the ``gradtrace`` command prints
    it as a user error (exit status 2, no traceback).
    """


class ChecksumError(RuntimeError):
    """A file does not have its published checksum; it was not loaded."""


@dataclass(frozen=True)
class ImageData:
    """A dataset in memory: ``(images uint8 [N, C, H, W], labels int64 [N])`` per split.

    ``train`` is the official training set (the pool the validation split is carved from);
    ``val`` and ``test`` are ``None`` when the source has no such split of its own.
    """

    train: Split
    test: Split | None
    val: Split | None
    classes: tuple[str, ...]


def parse_dataset(dataset: str) -> tuple[str, Path | None]:
    """Split ``dataset`` into its kind and, for ``imagefolder:<path>``, the folder path."""
    if not isinstance(dataset, str):
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {dataset!r}")
    if dataset.startswith("imagefolder:"):
        path = dataset.removeprefix("imagefolder:")
        if not path:
            raise ValueError(
                "dataset 'imagefolder:<path>' needs a folder path, e.g. imagefolder:data/pets"
            )
        return "imagefolder", Path(path).expanduser()
    check_choice("dataset", dataset, DATASETS)
    return dataset, None


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (same on every machine and run).

    Used to give every random stream its own generator: the split, the subset, each epoch's
    shuffle and each step's augmentation never share or advance each other's state.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def class_balanced_split(
    labels: torch.Tensor, size: int, seed: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``size`` indices class by class; return ``(chosen, rest)``, both sorted.

    Each class gets a share proportional to its frequency (largest remainder; ties go to the
    lower class index), so a balanced pool gives exactly ``size / num_classes`` per class
    (CIFAR-100: 2,500 -> 25 per class). Which images of a class are chosen is random but a pure
    function of ``seed``.
    """
    n = labels.numel()
    if not 0 <= size <= n:
        raise ValueError(f"split size must be between 0 and {n}; got {size}")
    counts = torch.bincount(labels, minlength=num_classes)
    quota = counts * size // n
    remainder = counts * size % n
    missing = size - int(quota.sum())
    # Stable sort: equal remainders keep class order, so ties go to the lower class index.
    order = torch.sort(remainder, descending=True, stable=True).indices
    quota[order[:missing]] += 1

    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(n, generator=generator)
    by_class = shuffled[torch.sort(labels[shuffled], stable=True).indices]
    sorted_labels = labels[by_class]
    starts = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(n) - starts[sorted_labels]
    chosen_mask = rank_in_class < quota[sorted_labels]
    chosen = torch.sort(by_class[chosen_mask]).values
    rest = torch.sort(by_class[~chosen_mask]).values
    return chosen, rest
