"""CIFAR-10 and CIFAR-100 from the official python-pickle archives.

The archive's MD5 is checked before anything in it is unpickled (a pickle can run code), then
the pickles are read straight out of the tar, without extracting it. torchvision (the
``zoo``/``train`` extra) supplies the published URLs and checksums, imported when needed.
"""

from __future__ import annotations

import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from gradtrace.checks import check_choice
from gradtrace.data.download import DownloadError, download_verified, verify_md5
from gradtrace.data.image_data import DataNotFoundError, ImageData, Split

__all__ = [
    "CifarArchive",
    "cifar_archive",
    "cifar_missing_message",
    "download_cifar",
    "read_cifar",
]


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
    check_choice("CIFAR dataset", name, classes)
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
        f"{archive.url} and put it there (or point --data.root at the folder holding it), or "
        f"run with downloads allowed (download=True, the default) on a machine with internet"
    )


def download_cifar(name: str, root: str | Path, md5: str | None = None) -> Path:
    """Download the archive into ``root`` unless it is there: one process at a time, to a
    temporary file, MD5-checked, then renamed (see :func:`download_verified`)."""
    archive = cifar_archive(name)
    expected = md5 or archive.md5
    path = Path(root) / archive.filename
    try:
        return download_verified(archive.url, path, expected)
    except DownloadError as err:
        raise DataNotFoundError(
            f"{err}; {archive.name} needs {archive.filename} (MD5 {expected}) at {path}: "
            f"download it from {archive.url} elsewhere and put it there, or point --data.root "
            f"at a folder holding it"
        ) from err


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
    ``download`` is true, otherwise :class:`DataNotFoundError` says what to put where.
    """
    archive = cifar_archive(name)
    expected = md5 or archive.md5
    path = Path(root) / archive.filename
    if not path.is_file():
        if not download:
            raise DataNotFoundError(cifar_missing_message(archive, path, expected))
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
