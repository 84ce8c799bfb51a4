"""Downloads that many processes can start at once: one download per file, verified, atomic.

Several runs starting together on a fresh machine (a sweep's agents, Table 1's runs) all ask
for the same archive. :func:`download_verified` takes an exclusive lock next to the file
(``<file>.lock``, a ``filelock.FileLock``, which comes with torch), downloads to a temporary
file in the same folder (``urllib``: ``http(s)://`` and ``file://`` URLs, redirects followed),
checks the published MD5, then renames it into place, so the final path only ever holds a
complete, verified file. A process that waited on the lock finds the verified file and reuses
it. The lock file is removed afterwards, whether the download worked or not: the lock only
saves duplicate downloads (the rename keeps concurrent ones correct), so a process that locks
a removed file at worst downloads once more.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import urllib.request
from pathlib import Path

from filelock import FileLock

from gradtrace.data.image_data import ChecksumError

__all__ = ["DownloadError", "download_verified", "md5_of", "verify_md5"]

TIMEOUT_S = 60  # a silent firewall would otherwise hang a run forever


class DownloadError(OSError):
    """No URL could be fetched (offline, server error); the message names the URL and why."""


def md5_of(path: str | Path) -> str:
    """The file's MD5 in hex, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: str | Path, md5: str, source: str) -> None:
    """Raise :class:`ChecksumError` naming the file and both checksums when they differ."""
    actual = md5_of(path)
    if actual != md5:
        raise ChecksumError(
            f"{path} failed its MD5 check: expected {md5}, got {actual}. The file is truncated, "
            f"corrupted or not the official one, so it was not loaded. Delete it and "
            f"download it again from {source}"
        )


def download_verified(urls: str | list[str], path: str | Path, md5: str) -> Path:
    """Make ``path`` a verified copy of the file at the first of ``urls`` that answers.

    Holds ``<path>.lock`` throughout, so concurrent callers download once and the others reuse
    the file. A file already at ``path`` is verified, never re-downloaded (a corrupted one
    raises :class:`ChecksumError`). Raises :class:`DownloadError` when no URL could be read
    and :class:`ChecksumError` when the download does not match ``md5``; either way nothing is
    left at ``path``.
    """
    path = Path(path)
    urls = [urls] if isinstance(urls, str) else list(urls)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = Path(str(path) + ".lock")
    try:
        with FileLock(str(lock_path)):
            return _download_locked(urls, path, md5)
    finally:
        lock_path.unlink(missing_ok=True)


def _download_locked(urls: list[str], path: Path, md5: str) -> Path:
    if path.is_file():
        verify_md5(path, md5, urls[0])
        return path
    errors = []
    for url in urls:
        temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part"
        try:
            _fetch(url, temporary)
            verify_md5(temporary, md5, url)
            os.replace(temporary, path)
            return path
        except OSError as err:  # urllib's URLError and socket timeouts are OSErrors
            errors.append(f"{url}: {err}")
        finally:
            temporary.unlink(missing_ok=True)
    raise DownloadError(f"could not download {path.name} ({'; '.join(errors)})")


def _fetch(url: str, destination: Path) -> None:
    # Like torchvision's downloader, name the client: some hosts refuse urllib's default.
    request = urllib.request.Request(url, headers={"User-Agent": "gradtrace"})
    with (
        urllib.request.urlopen(request, timeout=TIMEOUT_S) as response,
        open(destination, "wb") as out,
    ):
        shutil.copyfileobj(response, out)
