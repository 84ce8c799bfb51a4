"""The ``gradtrace`` command's user errors: one line naming what was wrong, exit status 2,
a traceback only with ``--debug``; and a normal run's output free of Lightning's noise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import gradtrace
from gradtrace.cli.main import main
from gradtrace.data import DataNotFoundError, fashion_mnist

SRC = Path(gradtrace.__file__).resolve().parent.parent
TINY = [
    "--data.dataset=synthetic",
    "--data.synthetic_sizes=[200, 50]",
    "--data.val_size=20",
    "--data.batch_size=10",
    "--model.arch=vgg08",
]


def user_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line ``gradtrace`` prints for ``args``, checking the exit status is 2."""
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("gradtrace: ")
    return line.removeprefix("gradtrace: ").removeprefix("error: ")


def test_missing_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    offline = [f"--data.root={tmp_path / 'empty'}", "--data.download=false"]
    line = user_error(["fit", "--data.dataset=fashion_mnist", *offline], capsys)
    assert line.startswith(f"Fashion-MNIST not found: looked in {tmp_path / 'empty'}, ")
    assert "apt-get install dataset-fashion-mnist" in line
    line = user_error(["fit", "--data.dataset=cifar10", *offline], capsys)
    assert line.startswith("cifar10 needs cifar-10-python.tar.gz (MD5 c58f30108f718f92721af3b9")
    assert "point --data.root at the folder holding it" in line


def test_bad_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = user_error(["fit", f"--data.dataset=imagefolder:{tmp_path / 'nope'}"], capsys)
    assert line.startswith(f"imagefolder path {tmp_path / 'nope'} does not exist")
    line = user_error(["fit", "--config", "table1/vgg99"], capsys)
    assert line.startswith("no config file 'table1/vgg99'; shipped configs: arch/googlenet")


def test_unknown_dataset_and_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    line = user_error(["fit", "--data.dataset=cifar7"], capsys)
    assert line == (
        "dataset must be one of cifar10, cifar100, fashion_mnist, synthetic, "
        "imagefolder:<path>; got 'cifar7' (all options: gradtrace fit --help)"
    )
    line = user_error(["fit", *TINY, "--data.batch_size=-3"], capsys)
    assert line.startswith("batch_size must be an integer >= 1; got -3")
    line = user_error(["fit", *TINY, "--data.augment=flip"], capsys)
    assert line.startswith("augment must be one of none, crop, crop_flip; got 'flip'")
    line = user_error(["fit", *TINY, "--model.arch=resnet57"], capsys)
    assert line.startswith("unknown model 'resnet57'; closest: resnet56")
    line = user_error(["fit", "--no-such-option=3"], capsys)
    assert line.startswith("unrecognized arguments: --no-such-option=3")


def test_a_global_batch_that_does_not_split_over_the_processes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=3", "--trainer.strategy=ddp"]
    line = user_error(["fit", *TINY, *ddp, f"--trainer.default_root_dir={tmp_path}"], capsys)
    assert line == (
        "data.batch_size is the global batch, split equally over the 3 processes: it must be a "
        "multiple of 3; got 10 (all options: gradtrace fit --help)"
    )
    assert not list(tmp_path.rglob("metrics.csv"))  # stopped before training


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="does not exist"):
        main(["fit", f"--data.dataset=imagefolder:{tmp_path / 'nope'}", "--debug"])


@pytest.mark.slow
@pytest.mark.integration
def test_a_run_prints_no_lightning_noise(tmp_path: Path) -> None:
    """From the shell: no LightningCLI "args parameter" warning, no log_every_n_steps
    warning on a short epoch, no tips or device banners."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(SRC)
    args = [*TINY, "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}"]
    done = subprocess.run(
        [sys.executable, "-m", "gradtrace", "fit", *args, "--trainer.enable_progress_bar=false"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    for noise in ("args parameter", "log_every_n_steps", "Tip:", "GPU available", "Deprecat"):
        assert noise not in output
    assert list(tmp_path.rglob("metrics.csv"))  # it did train
