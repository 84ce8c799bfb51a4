"""Fashion-MNIST from the original IDX files: found locally or downloaded, never half-written.

Searched, in order: ``root``, ``root/fashion-mnist``, torchvision's ``root/FashionMNIST/raw``
and Debian's ``dataset-fashion-mnist`` package; then, when downloads are allowed, fetched from
torchvision's mirrors and checked against their published MD5s. The 28x28 images are
zero-padded to 32x32.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from gradtrace.data.download import DownloadError, download_verified
from gradtrace.data.image_data import DataNotFoundError, ImageData

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_SYSTEM_DIR",
    "download_fashion_mnist",
    "fashion_mnist_dirs",
    "fashion_mnist_missing_message",
    "fashion_mnist_train_size",
    "find_fashion_mnist",
    "locate_fashion_mnist",
    "read_fashion_mnist",
    "read_idx",
]


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


def fashion_mnist_missing_message(root: str | Path, download_error: str | None = None) -> str:
    """One line: where gradtrace looked, why a download failed, and the ways to provide the data."""
    names = ", ".join(stem + "[.gz]" for pair in FASHION_MNIST_FILES.values() for stem in pair)
    places = ", ".join(str(d) for d in fashion_mnist_dirs(root))
    download = (
        f"the download failed ({download_error}); "
        if download_error
        else "downloads are off (download=False); "
    )
    return (
        f"Fashion-MNIST not found: looked in {places}; {download}provide it by installing "
        f"Debian's package (apt-get install dataset-fashion-mnist, which make demo does as "
        f"root), by copying the IDX files {names} into one of those folders (or pointing "
        f"--data.root at them), or by running once on a machine with internet"
    )


def download_fashion_mnist(
    root: str | Path,
    mirrors: Sequence[str] | None = None,
    resources: Sequence[tuple[str, str]] | None = None,
) -> Path:
    """Download the four gzipped IDX files into ``root/FashionMNIST/raw`` (torchvision's layout).

    ``mirrors`` and ``resources`` (file name, MD5) default to torchvision's published ones. Each
    file is fetched by :func:`download_verified`: one process at a time, MD5-checked, renamed
    into place. Raises :class:`DownloadError` when no mirror answers.
    """
    from torchvision.datasets import FashionMNIST

    raw = Path(root) / "FashionMNIST" / "raw"
    for filename, md5 in resources or FashionMNIST.resources:
        urls = [mirror + filename for mirror in mirrors or FashionMNIST.mirrors]
        download_verified(urls, raw / filename, md5)
    return raw


def locate_fashion_mnist(root: str | Path, download: bool = True) -> tuple[Path, str]:
    """The folder holding Fashion-MNIST and one line saying where it came from.

    Looks in :func:`fashion_mnist_dirs` (``root``, its ``fashion-mnist/`` and torchvision's
    ``FashionMNIST/raw/``, then Debian's package), then downloads into torchvision's layout
    under ``root`` when ``download``. Raises :class:`DataNotFoundError` listing the ways to
    provide the data when all of that fails.
    """
    found = find_fashion_mnist(root)
    if found is not None:
        return found, f"Fashion-MNIST: found in {found}"
    if not download:
        raise DataNotFoundError(fashion_mnist_missing_message(root))
    try:
        directory = download_fashion_mnist(root)
    except DownloadError as err:
        raise DataNotFoundError(fashion_mnist_missing_message(root, str(err))) from err
    return directory, f"Fashion-MNIST: downloaded to {directory} (published MD5s checked)"


def read_fashion_mnist(root: str | Path, download: bool = False) -> ImageData:
    """Fashion-MNIST as ``[N, 1, 32, 32]`` uint8: the 28x28 images with a 2-pixel zero border."""
    directory, _ = locate_fashion_mnist(root, download)
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
