"""The sandbox in which tests/test_docs.py runs the shell blocks of README.md and docs/*.md: a
temporary directory holding what the commands need, where every training is shrunk to two
steps.

What a sandbox holds (:func:`create_sandbox`):

- ``Makefile``, ``pyproject.toml`` and ``scripts/``: links to the repository's;
- ``.venv/``: links to this test session's environment, with a fresh install stamp, so the
  Makefile's targets use it and never reinstall it;
- ``data/``: small files in the real on-disk formats (:mod:`helpers.data_files`): one CIFAR
  archive under both official names (it holds CIFAR-10's and CIFAR-100's members, so one
  ``--data.md5`` serves both) and Fashion-MNIST's IDX files, each with 32 training and 16 test
  images;
- ``sweeps/``: the repository's sweep files cut to one cell (each parameter's first value),
  their command extended by :data:`SHRINK_OPTIONS` (and ``--data.md5`` for CIFAR);
- a shrinking ``gradtrace``, first on ``PATH`` unless a command runs unshrunk: the real
  command with :data:`SHRINK_OPTIONS` and, for CIFAR, ``--data.md5`` of the sandbox's archive
  appended to every ``fit``, ``validate``, ``test`` and ``predict``, and
  :data:`PROBE_SHRINK_OPTIONS` to every ``probe`` (:func:`shrunk_arguments`); other commands,
  ``--help`` and ``--print_config`` run unchanged;
- an environment in which nothing can be downloaded (every proxy is a name that does not
  resolve) and W&B logs offline; ``$DOCS_TEST_OVERRIDES`` holds the shrinking options for the
  launchers' runs, which start ``python -m gradtrace`` themselves.
"""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gradtrace.cli.main import USER_ERRORS
from gradtrace.cli.trainer_cli import parsed_cli
from helpers.data_files import md5_of, write_cifar_archive, write_fashion_mnist
from helpers.fork_server import CLIENT, SERVER_VARIABLE

__all__ = [
    "PROBE_SHRINK_OPTIONS",
    "SHRINK_OPTIONS",
    "DocsAssets",
    "Sandbox",
    "create_sandbox",
    "resolved_settings",
    "shrunk_arguments",
    "write_docs_assets",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = REPO_ROOT / "tests"

TRAIN_IMAGES, TEST_IMAGES = 32, 16
"""Images per data file in the sandbox: 16 validation + 16 training images, 16 test images."""

SHRINK_OPTIONS = (
    "--trainer.max_epochs=1",
    "--trainer.max_steps=2",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--data.batch_size=8",
    "--data.val_size=16",
    "--data.subset=null",
    f"--data.synthetic_sizes=[{TRAIN_IMAGES}, {TEST_IMAGES}]",
)
"""Appended to every training in the sandbox: one epoch of two steps of 8 images, then one
validation of 16 images. ``max_steps`` too, since a launcher's own overrides come after these
(``--trainer.max_epochs=10``); no subset, since the sandbox's files hold fewer images than a
documented ``--data.subset``. Sizes, not Lightning's ``limit_*_batches``: on the command line
``--trainer.limit_val_batches 1`` reads as the float 1.0, the whole set."""

PROBE_SHRINK_OPTIONS = ("--seeds", "1", "--batch-size", "8")
"""Appended to every ``gradtrace probe`` in the sandbox: one seed of 8 images instead of 3 of
64 (a documented five-model probe takes half a minute on one core; the sandbox's datasets hold
32 training images)."""

CIFAR_DATASETS = ("cifar10", "cifar100")
CIFAR_FILENAMES = ("cifar-10-python.tar.gz", "cifar-100-python.tar.gz")
TRAINING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
INFORMATION_OPTIONS = ("-h", "--help", "--print_config")
UNRESOLVABLE_PROXY = "http://proxy.docs-test.invalid:3128"
"""``.invalid`` never resolves (RFC 2606): a download fails with "Name or service not known",
as it does offline."""
BLOCK_TIMEOUT_S = 300


def resolved_settings(args: Sequence[str]) -> dict[str, Any]:
    """The settings ``gradtrace <args>`` runs with (``args`` start with the subcommand), by
    parsing only: every ``model``, ``data`` and ``trainer`` option and the others, config
    files and flags resolved, without the list of config files read."""
    settings = parsed_cli(list(args)).config[args[0]].as_dict()
    settings.pop("config", None)
    return settings


def shrunk_arguments(args: Sequence[str], cifar_md5: str) -> list[str]:
    """``args`` of a ``gradtrace`` command with :data:`SHRINK_OPTIONS` appended to a training
    (and ``--data.md5=cifar_md5`` when it reads CIFAR) and :data:`PROBE_SHRINK_OPTIONS` to a
    probe; any other command, or one that does not parse (its own run reports that),
    unchanged."""
    args = list(args)
    if not args or args[0] not in (*TRAINING_SUBCOMMANDS, "probe"):
        return args
    if any(arg.split("=")[0] in INFORMATION_OPTIONS for arg in args):
        return args
    if args[0] == "probe":  # appended last: argparse keeps an option's last value
        return [*args, *PROBE_SHRINK_OPTIONS]
    try:
        dataset = resolved_settings(args)["data"]["dataset"]
    except USER_ERRORS:
        return args
    checksum = [f"--data.md5={cifar_md5}"] if dataset in CIFAR_DATASETS else []
    return [*args, *SHRINK_OPTIONS, *checksum]


@dataclass(frozen=True)
class DocsAssets:
    """What every sandbox of a test session shares, written once (:func:`write_docs_assets`)."""

    folder: Path
    cifar_md5: str

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def bin(self) -> Path:
        """Holds the shrinking ``gradtrace``."""
        return self.folder / "bin"

    @property
    def sweeps(self) -> Path:
        return self.folder / "sweeps"

    @property
    def launcher_overrides(self) -> list[str]:
        """What the launchers' runs get (``$DOCS_TEST_OVERRIDES``): they all read CIFAR."""
        return [*SHRINK_OPTIONS, f"--data.md5={self.cifar_md5}"]


def _write_both_cifar_archives(folder: Path, scratch: Path) -> str:
    # One archive holding both datasets' members: the readers extract only their own, and
    # identical bytes under both names give one MD5.
    members: dict[str, bytes] = {}
    for name in CIFAR_DATASETS:
        path, _, _ = write_cifar_archive(scratch / name, name, TRAIN_IMAGES, TEST_IMAGES)
        with tarfile.open(path, "r:gz") as tar:
            for member in tar.getmembers():
                handle = tar.extractfile(member)
                assert handle is not None, member.name
                members[member.name] = handle.read()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    for filename in CIFAR_FILENAMES:
        (folder / filename).write_bytes(archive.getvalue())
    return md5_of(folder / CIFAR_FILENAMES[0])


def _shrunk_sweep(sweep: dict[str, Any], cifar_md5: str) -> dict[str, Any]:
    parameters = {
        name: {"values": spec["values"][:1]} if "values" in spec else spec
        for name, spec in sweep["parameters"].items()
    }
    named = [arg.split("=", 1)[1] for arg in sweep["command"] if arg.startswith("--data.dataset=")]
    chosen = parameters.get("data.dataset", {}).get("values", named)
    checksum = [f"--data.md5={cifar_md5}"] if set(chosen) <= set(CIFAR_DATASETS) else []
    command = list(sweep["command"])
    # Before ${args}, which must stay last; a launcher's own overrides come after it and win.
    command[command.index("${args}") : command.index("${args}")] = [*SHRINK_OPTIONS, *checksum]
    return {**sweep, "command": command, "parameters": parameters}


SHIM = '''\
#!{python}
"""gradtrace for the docs tests: the real command with every training shrunk
(tests/helpers/docs_sandbox.py), run by the worker's fork server when there is one
(tests/helpers/fork_server.py)."""
import os
import sys

if {variable!r} in os.environ:
{client}
else:
    sys.path.insert(0, {tests!r})
    from gradtrace.cli.main import main
    from helpers.docs_sandbox import shrunk_arguments

    main(shrunk_arguments(sys.argv[1:], {md5!r}))
'''


def write_docs_assets(folder: Path) -> DocsAssets:
    """Write the data files, the shrunk sweep files and the shrinking ``gradtrace`` into
    ``folder``."""
    data = folder / "data"
    data.mkdir(parents=True)
    assets = DocsAssets(folder, _write_both_cifar_archives(data, folder / "cifar-parts"))
    write_fashion_mnist(data, TRAIN_IMAGES, TEST_IMAGES)
    assets.sweeps.mkdir()
    for path in sorted((REPO_ROOT / "sweeps").glob("*.yaml")):
        sweep = _shrunk_sweep(yaml.safe_load(path.read_text()), assets.cifar_md5)
        (assets.sweeps / path.name).write_text(yaml.safe_dump(sweep, sort_keys=False))
    assets.bin.mkdir()
    shim = assets.bin / "gradtrace"
    client = CLIENT.format(variable=SERVER_VARIABLE, md5=assets.cifar_md5)
    shim.write_text(
        SHIM.format(
            python=sys.executable,
            variable=SERVER_VARIABLE,
            client=textwrap.indent(client, "    "),
            tests=str(TESTS_DIR),
            md5=assets.cifar_md5,
        )
    )
    shim.chmod(0o755)
    return assets


@dataclass
class Sandbox:
    """A directory to run documented commands in (:func:`create_sandbox`)."""

    root: Path
    env: dict[str, str]
    """The commands' environment; a ``docs-test: env`` directive adds to it."""
    shim_folder: Path
    """Holds the shrinking ``gradtrace``, put first on ``PATH`` for shrunk runs."""
    timeout_s: float = BLOCK_TIMEOUT_S

    def run(self, script: str, *, shrunk: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with bash (``set -euo pipefail``) in the sandbox, stdout and stderr
        together; ``shrunk=False`` leaves ``gradtrace`` unchanged (the repository's
        command)."""
        env = dict(self.env)
        if shrunk:
            env["PATH"] = f"{self.shim_folder}{os.pathsep}{env['PATH']}"
        return subprocess.run(
            ["bash", "-c", f"set -euo pipefail\n{script}"],
            cwd=self.root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=self.timeout_s,
            check=False,
        )


def _mirror_environment(prefix: Path, mirror: Path) -> None:
    # Links to the environment's parts, so ``.venv/bin/python`` runs it, and an install stamp
    # newer than pyproject.toml: the Makefile's targets never reinstall from the sandbox.
    mirror.mkdir()
    for entry in prefix.iterdir():
        if not entry.name.startswith("."):
            (mirror / entry.name).symlink_to(entry)
    (mirror / ".installed-dev").touch()


def _environment(root: Path, assets: DocsAssets, base: Mapping[str, str]) -> dict[str, str]:
    proxies = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
    passed = {
        key: value
        for key, value in base.items()
        if not key.startswith("WANDB_") and key not in ("no_proxy", "NO_PROXY")
    }
    return {
        **passed,
        "PATH": os.pathsep.join([str(root / ".venv" / "bin"), base["PATH"]]),
        **dict.fromkeys(proxies, UNRESOLVABLE_PROXY),
        "WANDB_MODE": "offline",
        # One thread per process, as the suite's xdist workers (sized for 2 cores).
        "OMP_NUM_THREADS": "1",
        "DOCS_TEST_OVERRIDES": shlex.join(assets.launcher_overrides),
    }


def create_sandbox(root: Path, assets: DocsAssets, fork_server: Path | None = None) -> Sandbox:
    """Fill the empty directory ``root`` with what the documented commands need (see the
    module docstring); ``gradtrace`` runs in ``fork_server`` when given (its socket)."""
    for name in ("Makefile", "pyproject.toml", "scripts"):
        (root / name).symlink_to(REPO_ROOT / name)
    _mirror_environment(Path(sys.prefix), root / ".venv")
    (root / "data").mkdir()
    for path in assets.data.iterdir():
        (root / "data" / path.name).symlink_to(path)
    (root / "sweeps").symlink_to(assets.sweeps)
    (root / "docs" / "images").mkdir(parents=True)  # where the stabilizers figure is written
    env = _environment(root, assets, os.environ)
    if fork_server is not None:
        env[SERVER_VARIABLE] = str(fork_server)
    return Sandbox(root, env, assets.bin)
