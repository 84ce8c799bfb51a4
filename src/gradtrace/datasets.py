"""Image datasets read into memory as uint8 tensors, and the seeded class-balanced split.

Every source becomes an :class:`ImageData`: per split, uint8 images ``[N, C, H, W]`` and int64
labels ``[N]``. Keeping a whole split in one tensor (CIFAR-100's training set is 150 MB) lets
:class:`gradtrace.ImageDataModule` cut batches by index instead of collating samples.

Sources (the ``dataset`` argument of the data module, see :data:`DATASETS`):

- ``cifar10`` / ``cifar100``: the official python-pickle archives. The archive's MD5 is checked
  before anything in it is unpickled (a pickle can run code), then the pickles are read straight
  out of the tar, without extracting it.
- ``fashion_mnist``: the original IDX files (raw or gzipped) from ``root`` or from Debian's
  ``dataset-fashion-mnist`` package, zero-padded from 28x28 to 32x32.
- ``synthetic``: seeded, learnable, class-conditional images of any size and class count.
- ``imagefolder:<path>``: torchvision's ImageFolder layout, every image decoded once and resized.

torchvision (the ``zoo``/``train`` extra) is imported inside the functions that need it, so
importing this module costs only torch.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_SYSTEM_DIR",
    "ChecksumError",
    "CifarArchive",
    "ImageData",
    "cifar_archive",
    "class_balanced_split",
    "derive_seed",
    "find_fashion_mnist",
    "image_folder_classes",
    "image_folder_layout",
    "parse_dataset",
    "read_cifar",
    "read_fashion_mnist",
    "read_idx",
    "read_image_folder",
    "read_synthetic",
    "synthetic_images",
    "synthetic_templates",
    "verify_md5",
]

#: Valid values of the data module's ``dataset`` argument.
DATASETS = ("cifar10", "cifar100", "fashion_mnist", "synthetic", "imagefolder:<path>")

Split = tuple[torch.Tensor, torch.Tensor]


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
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {dataset!r}")
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


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100


class ChecksumError(RuntimeError):
    """A downloaded file does not have its published checksum; it was not loaded."""


@dataclass(frozen=True)
class CifarArchive:
    """Where a CIFAR archive comes from and what is inside it (torchvision's constants)."""

    name: str
    filename: str
    url: str
    md5: str
    folder: str
    train_members: tuple[str, ...]
    test_member: str
    meta_member: str
    names_key: str
    labels_key: str


def cifar_archive(name: str) -> CifarArchive:
    """The official archive of ``cifar10`` or ``cifar100`` (URL, MD5, members)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    classes = {"cifar10": (CIFAR10, "labels"), "cifar100": (CIFAR100, "fine_labels")}
    if name not in classes:
        raise ValueError(f"CIFAR dataset must be one of cifar10, cifar100; got {name!r}")
    cls, labels_key = classes[name]
    return CifarArchive(
        name=name,
        filename=cls.filename,
        url=cls.url,
        md5=cls.tgz_md5,
        folder=cls.base_folder,
        train_members=tuple(member for member, _ in cls.train_list),
        test_member=cls.test_list[0][0],
        meta_member=cls.meta["filename"],
        names_key=cls.meta["key"],
        labels_key=labels_key,
    )


def cifar_missing_message(archive: CifarArchive, path: Path, md5: str) -> str:
    """What to put where when the archive is absent."""
    return (
        f"{archive.name} needs {archive.filename} (MD5 {md5}) at {path}: download it from "
        f"{archive.url} and put it there, or pass download=True on a machine with internet"
    )


def download_cifar(name: str, root: str | Path, md5: str | None = None) -> Path:
    """Download the archive into ``root`` with torchvision's downloader unless it is there."""
    from torchvision.datasets import utils as tv_utils

    archive = cifar_archive(name)
    expected = md5 or archive.md5
    path = Path(root) / archive.filename
    if path.is_file():
        return path
    try:
        tv_utils.download_url(archive.url, str(root), archive.filename, expected)
    except (OSError, RuntimeError) as err:  # urllib's URLError is an OSError
        raise RuntimeError(
            f"could not download {archive.url} ({err}); "
            + cifar_missing_message(archive, path, expected)
        ) from err
    return path


def verify_md5(path: str | Path, md5: str, source: str) -> None:
    """Raise :class:`ChecksumError` naming the file and both checksums when they differ."""
    from torchvision.datasets.utils import calculate_md5

    actual = calculate_md5(path)
    if actual != md5:
        raise ChecksumError(
            f"{path} failed its MD5 check: expected {md5}, got {actual}. The file is truncated, "
            f"corrupted or not the official archive, so it was not unpickled. Delete it and "
            f"download it again from {source}"
        )


def _read_pickle(tar: tarfile.TarFile, member: str, path: Path) -> dict:
    try:
        handle = tar.extractfile(member)
    except KeyError:
        handle = None
    if handle is None:
        raise ValueError(f"{path} has no file {member}: it is not a CIFAR python archive")
    with handle:
        return pickle.load(handle, encoding="latin1")


def _cifar_split(entries: list[dict], labels_key: str, path: Path) -> Split:
    images = torch.cat([torch.as_tensor(entry["data"]) for entry in entries])
    labels = torch.cat([torch.as_tensor(entry[labels_key], dtype=torch.int64) for entry in entries])
    if images.dtype != torch.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: expected uint8 data of shape [N, 3072]; "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images.reshape(-1, 3, 32, 32), labels


def read_cifar(
    name: str, root: str | Path, md5: str | None = None, download: bool = False
) -> ImageData:
    """Read ``cifar10`` or ``cifar100`` from its official archive in ``root``.

    The archive's MD5 (``md5``, default: the published one) is verified before anything is
    unpickled; a mismatch raises :class:`ChecksumError`. A missing archive is downloaded when
    ``download`` is true, otherwise ``FileNotFoundError`` says what to put where.
    """
    archive = cifar_archive(name)
    expected = md5 or archive.md5
    path = Path(root) / archive.filename
    if not path.is_file():
        if not download:
            raise FileNotFoundError(cifar_missing_message(archive, path, expected))
        download_cifar(name, root, md5)
    verify_md5(path, expected, archive.url)
    with tarfile.open(path, "r:gz") as tar:
        train = [
            _read_pickle(tar, f"{archive.folder}/{member}", path)
            for member in archive.train_members
        ]
        test = [_read_pickle(tar, f"{archive.folder}/{archive.test_member}", path)]
        meta = _read_pickle(tar, f"{archive.folder}/{archive.meta_member}", path)
    return ImageData(
        train=_cifar_split(train, archive.labels_key, path),
        test=_cifar_split(test, archive.labels_key, path),
        val=None,
        classes=tuple(meta[archive.names_key]),
    )


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)

#: Where Debian's ``dataset-fashion-mnist`` package installs the original files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an unsigned-byte IDX file (raw or ``.gz``) into a uint8 tensor of its shape.

    torchvision's ``read_sn3_pascalvincent_tensor`` only opens uncompressed files; Debian ships
    the gzipped originals, which this reads without writing an extracted copy.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files (type 0x08) are supported")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(shape)
    if len(data) != expected:
        raise ValueError(
            f"{path} is truncated or corrupted: its header says {shape} ({expected} bytes), "
            f"the file has {len(data)} bytes"
        )
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).reshape(shape)


def fashion_mnist_dirs(root: str | Path) -> list[Path]:
    """Folders searched for the IDX files, in order."""
    root = Path(root)
    return [root, root / "fashion-mnist", root / "FashionMNIST" / "raw", FASHION_MNIST_SYSTEM_DIR]


def _idx_path(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def find_fashion_mnist(root: str | Path) -> Path | None:
    """The first folder of :func:`fashion_mnist_dirs` holding all four IDX files."""
    stems = [stem for pair in FASHION_MNIST_FILES.values() for stem in pair]
    for directory in fashion_mnist_dirs(root):
        if all(_idx_path(directory, stem) is not None for stem in stems):
            return directory
    return None


def fashion_mnist_missing_message(root: str | Path) -> str:
    names = ", ".join(stem + "[.gz]" for pair in FASHION_MNIST_FILES.values() for stem in pair)
    places = ", ".join(str(d) for d in fashion_mnist_dirs(root))
    return (
        f"fashion_mnist needs the IDX files {names} in one of {places}; install Debian's "
        f"dataset-fashion-mnist package, copy the files there, or pass download=True on a "
        f"machine with internet"
    )


def download_fashion_mnist(root: str | Path) -> Path:
    """Download the IDX files with torchvision (into ``root/FashionMNIST/raw``) if absent."""
    found = find_fashion_mnist(root)
    if found is not None:
        return found
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(root), train=True, download=True)
    except (OSError, RuntimeError) as err:
        raise RuntimeError(
            f"could not download Fashion-MNIST ({err}); " + fashion_mnist_missing_message(root)
        ) from err
    return Path(root) / "FashionMNIST" / "raw"


def read_fashion_mnist(root: str | Path, download: bool = False) -> ImageData:
    """Fashion-MNIST as ``[N, 1, 32, 32]`` uint8: the 28x28 images with a 2-pixel zero border."""
    directory = find_fashion_mnist(root)
    if directory is None:
        if not download:
            raise FileNotFoundError(fashion_mnist_missing_message(root))
        directory = download_fashion_mnist(root)
    splits = {}
    for split, (images_stem, labels_stem) in FASHION_MNIST_FILES.items():
        images_path = _idx_path(directory, images_stem)
        labels_path = _idx_path(directory, labels_stem)
        assert images_path is not None  # find_fashion_mnist checked all four files
        assert labels_path is not None
        images = read_idx(images_path)
        labels = read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{images_path} and {labels_path} do not match: images {tuple(images.shape)}, "
                f"labels {tuple(labels.shape)}"
            )
        splits[split] = (F.pad(images.unsqueeze(1), (2, 2, 2, 2)), labels.long())
    return ImageData(
        train=splits["train"], test=splits["test"], val=None, classes=FASHION_MNIST_CLASSES
    )


def fashion_mnist_train_size(root: str | Path) -> int | None:
    """Number of training images from the IDX header (8 bytes read), or None if absent."""
    directory = find_fashion_mnist(root)
    if directory is None:
        return None
    path = _idx_path(directory, FASHION_MNIST_FILES["train"][1])
    assert path is not None
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        header = handle.read(8)
    return int.from_bytes(header[4:8], "big")


# --------------------------------------------------------------------------------------------
# Synthetic data

_TEMPLATE_GRID = 4  # each class template is a random 4x4 pattern, smoothly upsampled
_CONTRAST = 48.0  # grey levels per template standard deviation
_NOISE = 40.0  # grey levels per noise standard deviation
_CHUNK = 4096  # images generated at once (bounds the float32 working memory)


def synthetic_templates(
    num_classes: int, channels: int, size: tuple[int, int], seed: int
) -> torch.Tensor:
    """One smooth random pattern per class, ``[K, C, H, W]`` float32, zero mean, unit std."""
    generator = torch.Generator().manual_seed(derive_seed("synthetic-templates", seed))
    grid = torch.randn(num_classes, channels, _TEMPLATE_GRID, _TEMPLATE_GRID, generator=generator)
    templates = F.interpolate(grid, size=size, mode="bicubic", align_corners=False)
    flat = templates.flatten(1)
    flat = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)
    return flat.view_as(templates)


def synthetic_images(templates: torch.Tensor, num_images: int, seed: int) -> Split:
    """``num_images`` labelled images drawn around ``templates``; balanced classes.

    Each image is its class template circularly shifted by up to 1/8 of its size in each
    direction, plus independent Gaussian pixel noise: a CNN learns it quickly, a network whose
    gradients vanish stays at chance.
    """
    num_classes, channels, height, width = templates.shape
    generator = torch.Generator().manual_seed(derive_seed("synthetic-images", seed))
    labels = (torch.arange(num_images) % num_classes)[
        torch.randperm(num_images, generator=generator)
    ]
    max_shift_y, max_shift_x = max(height // 8, 0), max(width // 8, 0)
    images = torch.empty(num_images, channels, height, width, dtype=torch.uint8)
    rows, cols = torch.arange(height), torch.arange(width)
    for start in range(0, num_images, _CHUNK):
        chunk = labels[start : start + _CHUNK]
        n = chunk.numel()
        dy = torch.randint(-max_shift_y, max_shift_y + 1, (n, 1), generator=generator)
        dx = torch.randint(-max_shift_x, max_shift_x + 1, (n, 1), generator=generator)
        source = ((rows - dy) % height)[:, :, None] * width + ((cols - dx) % width)[:, None, :]
        shifted = (
            templates[chunk].flatten(2).gather(2, source.view(n, 1, -1).expand(n, channels, -1))
        )
        noise = torch.randn(shifted.shape, generator=generator)
        pixels = shifted.mul_(_CONTRAST).add_(noise, alpha=_NOISE).add_(127.5)
        images[start : start + n] = pixels.clamp_(0, 255).round_().view(n, channels, height, width)
    return images, labels


def read_synthetic(
    num_classes: int, channels: int, size: tuple[int, int], sizes: tuple[int, int], seed: int = 0
) -> ImageData:
    """A synthetic dataset: ``sizes = (training pool, test)`` images from shared templates."""
    templates = synthetic_templates(num_classes, channels, size, seed)
    return ImageData(
        train=synthetic_images(templates, sizes[0], derive_seed("train", seed)),
        test=synthetic_images(templates, sizes[1], derive_seed("test", seed)),
        val=None,
        classes=tuple(f"class_{k}" for k in range(num_classes)),
    )


# --------------------------------------------------------------------------------------------
# ImageFolder


def image_folder_layout(path: str | Path) -> dict[str, Path]:
    """The split folders of an ImageFolder tree.

    ``path/train`` (+ optional ``path/val``, ``path/test``) when ``path/train`` exists,
    otherwise ``{"train": path}`` (a flat tree of class folders, split by the data module).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"imagefolder path {path} does not exist or is not a folder")
    if not (path / "train").is_dir():
        return {"train": path}
    return {split: path / split for split in ("train", "val", "test") if (path / split).is_dir()}


def image_folder_classes(path: str | Path) -> list[str]:
    """Class names (sorted sub-folder names of the training folder): a directory listing."""
    from torchvision.datasets.folder import find_classes

    train = image_folder_layout(path)["train"]
    try:
        return find_classes(train)[0]
    except FileNotFoundError as err:
        raise ValueError(
            f"imagefolder path {path} has no class folders: expected <path>/<class>/<image> or "
            f"<path>/train/<class>/<image> (with optional val/ and test/ alike)"
        ) from err


def _load_image(path: str, mode: str, size: tuple[int, int]) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    with Image.open(path) as image:
        converted = image.convert(mode)
    # PIL's bilinear resize widens its filter when shrinking, i.e. it antialiases.
    resized = converted.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return pil_to_tensor(resized)


def read_image_folder(path: str | Path, channels: int, size: tuple[int, int]) -> ImageData:
    """Decode every image of an ImageFolder tree once: RGB (or grey), resized to ``size``.

    Images of ``val/`` or ``test/`` whose class folder is absent from ``train/`` are an error;
    a class folder may be empty in ``val/`` and ``test/``.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    classes = image_folder_classes(path)
    class_to_idx = {name: index for index, name in enumerate(classes)}
    mode = {1: "L", 3: "RGB"}[channels]
    splits: dict[str, Split] = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL releases the GIL
        for split, folder in image_folder_layout(path).items():
            extra = {p.name for p in folder.iterdir() if p.is_dir()} - set(class_to_idx)
            if extra:
                raise ValueError(
                    f"{folder} has class folders that {path} training data lacks: {sorted(extra)}"
                )
            samples = make_dataset(
                str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=split != "train"
            )
            images = list(pool.map(lambda s: _load_image(s[0], mode, size), samples))
            labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
            empty = torch.empty(0, channels, *size, dtype=torch.uint8)
            splits[split] = (torch.stack(images) if images else empty, labels)
    return ImageData(
        train=splits["train"],
        test=splits.get("test"),
        val=splits.get("val"),
        classes=tuple(classes),
    )
