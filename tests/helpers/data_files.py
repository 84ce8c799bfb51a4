"""Small files in the real on-disk formats: CIFAR-10/100 archives, Fashion-MNIST IDX files
and image folders (what gradtrace.data reads)."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from gradtrace.data import fashion_mnist

__all__ = [
    "COLOURS",
    "md5_of",
    "write_cifar_archive",
    "write_fashion_mnist",
    "write_idx",
    "write_image_folder",
]


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar_archive(
    root: Path, name: str, n_train: int, n_test: int, seed: int = 0
) -> tuple[Path, str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` laid out like the real one.

    Returns the path, its MD5 and the ``(data [N, 3072], labels [N])`` written per split.
    CIFAR-10's training set is spread over five ``data_batch_i`` pickles, as in the original.
    """
    rng = np.random.default_rng(seed)
    num_classes = 10 if name == "cifar10" else 100

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % num_classes
        rng.shuffle(labels)
        return rng.integers(0, 256, (n, 3072), dtype=np.uint8), labels

    train, test = split(n_train), split(n_test)
    if name == "cifar10":
        folder, key = "cifar-10-batches-py", "labels"
        parts = np.array_split(np.arange(n_train), 5)
        members = {
            f"data_batch_{i + 1}": {"data": train[0][p], key: train[1][p].tolist()}
            for i, p in enumerate(parts)
        }
        members["test_batch"] = {"data": test[0], key: test[1].tolist()}
        members["batches.meta"] = {"label_names": [f"c10_{k}" for k in range(10)]}
    else:
        folder, key = "cifar-100-python", "fine_labels"
        members = {
            "train": {"data": train[0], key: train[1].tolist(), "coarse_labels": [0] * n_train},
            "test": {"data": test[0], key: test[1].tolist(), "coarse_labels": [0] * n_test},
            "meta": {"fine_label_names": [f"c100_{k}" for k in range(100)]},
        }
    path = root / f"{'cifar-10' if name == 'cifar10' else 'cifar-100'}-python.tar.gz"
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for member, content in members.items():
            payload = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"{folder}/{member}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path, md5_of(path), {"train": train, "test": test}


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """An unsigned-byte IDX file: magic 0x0000 08 <ndim>, big-endian dims, raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def write_fashion_mnist(
    root: Path, n_train: int, n_test: int, compress: bool = True
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(1, 256, (n, 28, 28), dtype=np.uint8)  # no zeros: borders visible
        labels = (np.arange(n) % 10).astype(np.uint8)
        images_stem, labels_stem = fashion_mnist.FASHION_MNIST_FILES[split]
        write_idx(root / images_stem, images, compress)
        write_idx(root / labels_stem, labels, compress)
        written[split] = (images, labels)
    return written


COLOURS = [(255, 0, 0), (0, 200, 0), (10, 20, 250)]


def write_image_folder(folder: Path, per_class: int, sizes: tuple[tuple[int, int], ...]) -> None:
    """Class folders of solid-colour PNGs of assorted sizes (and one stray non-image file)."""
    for k, colour in enumerate(COLOURS):
        (folder / f"class_{k}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            Image.new("RGB", (w, h), colour).save(folder / f"class_{k}" / f"{i}.png")
    (folder / "class_0" / "notes.txt").write_text("not an image")
