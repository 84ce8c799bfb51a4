"""What ``pip install gradtrace`` gets: ``python -m build`` makes a wheel and an sdist; the
wheel holds the library, the ``gradtrace`` command's configs and ``py.typed``, no tests and no
benchmark code; a fresh virtual environment with only that wheel (``[train]``) runs the
command and the demo module."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import gradtrace
from helpers.venvs import base_closure, link_into

REPO = Path(gradtrace.__file__).resolve().parents[2]  # the checkout under test

# Every test builds the wheel and the sdist in a subprocess (the module fixture ``dist``).
pytestmark = pytest.mark.integration


def clean_env() -> dict[str, str]:
    """This process's environment without anything pointing Python at the checkout."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Wheel and sdist built by ``python -m build`` from a copy of the checkout."""
    pytest.importorskip("build", reason="`build` comes with gradtrace's dev extra")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    # benchmarks/ too: a package search widened beyond src/ would pick it up.
    for folder in ("src", "benchmarks"):
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    # No isolation: the build backend (setuptools) comes from this environment, offline.
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    [wheel] = out.glob("gradtrace-*.whl")
    [sdist] = out.glob("gradtrace-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


@pytest.mark.slow
def test_wheel_holds_the_library_configs_and_types_only(dist: dict[str, Path]) -> None:
    names = zipfile.ZipFile(dist["wheel"]).namelist()
    configs = REPO / "src/gradtrace/cli/configs"
    shipped = sorted(str(p.relative_to(REPO / "src")) for p in configs.rglob("*.yaml"))
    assert shipped
    assert set(shipped) <= set(names)
    assert "gradtrace/py.typed" in names
    assert "gradtrace/cli/main.py" in names
    assert "gradtrace/studies/demo.py" in names
    assert [n for n in names if "bench" in n] == []  # neither benchmarks/ nor gradtrace/bench/
    assert [n for n in names if "tests/" in n or n.split("/")[-1].startswith("test_")] == []


@pytest.mark.slow
def test_train_extra_does_not_force_numpy_below_2(dist: dict[str, Path]) -> None:
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        [meta] = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(wheel.read(meta).decode())
    requirements = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    for extra in ("", "plot", "zoo", "train"):
        for req in requirements:
            applies = req.marker is None or req.marker.evaluate({"extra": extra})
            if req.name == "numpy" and applies:
                assert not req.specifier.contains("2.0"), f"{extra or 'base'} pins {req}"


@pytest.mark.slow
def test_fresh_venv_with_only_the_wheel_runs_the_command_and_the_demo(
    dist: dict[str, Path], tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    python = venv / "bin" / "python"
    site = next((venv / "lib").glob("python*/site-packages"))
    # gradtrace[train]'s dependencies, linked from this environment (no GBs of torch to
    # download); pip then installs the wheel and finds them satisfied.
    link_into(site, base_closure("gradtrace", frozenset({"train"})))
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-input",
         "--disable-pip-version-check", f"{dist['wheel']}[train]"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=600,
    )  # fmt: skip
    if install.returncode != 0 and "NewConnectionError" in install.stdout + install.stderr:
        pytest.skip("the package index is unreachable (pip needed it for a missing dependency)")
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            args, capture_output=True, text=True, env=clean_env(), cwd=tmp_path, timeout=300
        )

    where = run(str(python), "-c", "import gradtrace; print(gradtrace.__file__)")
    assert where.stdout.strip().startswith(str(site))  # the wheel's copy, not the checkout
    config = run(str(venv / "bin" / "gradtrace"), "fit", "--config", "table1/vgg08",
                 "--print_config")  # fmt: skip
    assert config.returncode == 0, config.stderr[-2000:]
    assert "arch: coursework_vgg" in config.stdout
    assert "depth: 8" in config.stdout
    demo = run(str(python), "-m", "gradtrace.studies.demo", "--help")
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "--synthetic" in demo.stdout
