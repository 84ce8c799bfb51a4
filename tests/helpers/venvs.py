"""Fresh virtual environments holding exactly a distribution's dependency closure, linked from
this environment (no download): how the tests check what an install with fewer packages can
import and run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import gradtrace

__all__ = ["SRC", "base_closure", "link_into", "run_python", "venv_with"]

SRC = Path(gradtrace.__file__).resolve().parent.parent
"""The folder holding the gradtrace under test (put on ``PYTHONPATH`` in the venvs)."""


def run_python(python: str | Path, code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` with ``python``, the gradtrace under test on its path, no user site."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    environ.update(PYTHONPATH=str(SRC), PYTHONNOUSERSITE="1", **env)
    return subprocess.run(
        [str(python), "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=300,
    )


def base_closure(
    root: str = "gradtrace", extras: frozenset[str] = frozenset()
) -> list[metadata.Distribution]:
    """Installed distributions that ``pip install <root>`` (with ``extras``, default none)
    needs, recursively (``root`` itself left out)."""
    found: dict[str, tuple[metadata.Distribution, frozenset[str]]] = {}
    todo: list[tuple[str, frozenset[str]]] = [(root, extras)]
    while todo:
        name, extras = todo.pop()
        dist = metadata.distribution(name)  # PackageNotFoundError: the closure is incomplete
        key = canonicalize_name(dist.metadata["Name"])
        if key in found and extras <= found[key][1]:
            continue
        extras = extras | (found[key][1] if key in found else frozenset())
        found[key] = (dist, extras)
        for text in dist.requires or []:
            req = Requirement(text)
            environments = [{"extra": e} for e in sorted(extras)] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in environments):
                todo.append((req.name, frozenset(req.extras)))
    return [dist for key, (dist, _) in found.items() if key != canonicalize_name(root)]


def link_into(site: Path, dists: list[metadata.Distribution]) -> set[str]:
    """Symlink every top-level entry the distributions installed into ``site``."""
    linked: set[str] = set()
    for dist in dists:
        if dist.files is None:
            raise AssertionError(f"{dist.metadata['Name']} has no RECORD to link from")
        origin = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files}:
            if top in ("..", "__pycache__") or top in linked:
                continue  # scripts outside site-packages; shared byte-code folders
            (site / top).symlink_to(origin / top)
            linked.add(top)
    return linked


def venv_with(folder: Path, dists: list[metadata.Distribution]) -> tuple[Path, Path, set[str]]:
    """A venv in ``folder`` holding ``dists`` only: its python, its site-packages and the
    top-level names linked there."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120
    )
    python = folder / "bin" / "python"
    site = Path(
        run_python(
            python, "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        ).stdout.strip()
    )
    assert site.is_relative_to(folder)
    return python, site, link_into(site, dists)
