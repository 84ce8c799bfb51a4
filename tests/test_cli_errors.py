"""The ``gradtrace`` command's user errors: one line naming what was wrong, exit status 2,
a traceback only with ``--debug``; and a normal run's output free of Lightning's noise."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gradtrace
from gradtrace.cli.errors import UserError
from gradtrace.cli.main import COMMANDS, main
from gradtrace.cli.trainer_cli import parsed_cli
from gradtrace.cli.wandb_login import check_wandb_login
from gradtrace.data import DataNotFoundError, fashion_mnist
from helpers.data_files import write_image_folder

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
    assert line.startswith("gradtrace: error: ")
    return line.removeprefix("gradtrace: error: ")


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


def test_lightnings_own_optimizer_flags_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # One way to choose them, the model's options, which name the run; LightningCLI's
    # --optimizer used to replace --model.optimizer silently, in the same run directory.
    line = user_error(["fit", *TINY, "--optimizer", "SGD", "--optimizer.lr", "0.5"], capsys)
    assert line.startswith("unrecognized arguments: --optimizer SGD")
    line = user_error(["fit", *TINY, "--lr_scheduler=StepLR"], capsys)
    assert line.startswith("unrecognized arguments: --lr_scheduler=StepLR")


def test_option_prefixes_and_unknown_commands_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = user_error(["fit", *TINY, "--trainer.max_step", "3"], capsys)
    assert line.startswith("unrecognized arguments: --trainer.max_step 3")
    assert user_error(["fti", "--help"], capsys) == (
        "unknown command 'fti'; did you mean 'fit'? commands: fit, validate, test, predict, "
        "summary, compare, probe, coord-check (gradtrace --help)"
    )
    line = user_error(["summary", "--arch", "vgg08", "--mark"], capsys)
    assert line == "unrecognized arguments: --mark (all options: gradtrace summary --help)"


def test_wandb_without_a_login_is_one_line_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no W&B settings
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb"))
    root = f"--trainer.default_root_dir={tmp_path / 'runs'}"
    line = user_error(["fit", *TINY, "--wandb=true", root], capsys)
    assert line == (
        "--wandb true needs a W&B login: run `wandb login` (or set WANDB_API_KEY), or log to "
        "local files with WANDB_MODE=offline and upload them later with `wandb sync`"
    )
    assert not (tmp_path / "runs").exists()  # nothing was started
    # Each way W&B can log lets the run go on.
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".netrc").write_text("machine api.wandb.ai login user password k3y\n")
    check_wandb_login()  # after `wandb login`
    (tmp_path / "home" / ".netrc").write_text("machine example.org login user password k3y\n")
    with pytest.raises(UserError):
        check_wandb_login()
    for name, value in (("WANDB_API_KEY", "k3y"), ("WANDB_MODE", "offline")):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            check_wandb_login()


def test_models_and_data_that_cannot_work_fail_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = f"--trainer.default_root_dir={tmp_path / 'runs'}"
    # GoogLeNet's ImageNet stem leaves its auxiliary heads a 2x2 map on 32x32 images: said
    # before training, with the option that fixes it (it used to be torch's "Output size is
    # too small" at the first step).
    line = user_error(["fit", *TINY, "--model.arch=googlenet", root], capsys)
    assert line.startswith(
        "googlenet cannot take 32x32 images: GoogLeNet's auxiliary heads need a 14x14 to 16x16 "
        "map after inception 4a"
    )
    assert "--model.arch_kwargs '{stem: cifar}'" in line
    line = user_error(["fit", *TINY, "--model.arch=vgg", "--model.depth=38", root], capsys)
    assert "--model.arch coursework_vgg --model.depth 38" in line
    one_class = tmp_path / "pets"
    write_image_folder(one_class, 2, ((8, 8),))
    for extra in sorted(one_class.iterdir())[1:]:
        shutil.rmtree(extra)
    line = user_error(["fit", f"--data.dataset=imagefolder:{one_class}", root], capsys)
    assert line.startswith(
        f"imagefolder path {one_class} has one class folder ('class_0'); a classifier needs at "
        "least 2"
    )
    assert not (tmp_path / "runs").exists()


def test_every_option_says_what_it_does() -> None:
    parsers = parsed_cli(["fit"])._subcommand_parsers  # no public accessor
    assert sorted(parsers) == ["fit", "predict", "test", "validate"]
    for name, parser in parsers.items():
        assert parser.prog == f"gradtrace [options] {name}"
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or not action.option_strings:
                continue
            assert action.help, (name, action.option_strings)
            assert not action.help.startswith("(type"), (name, action.option_strings)


def test_help_reads_as_gradtrace(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["/somewhere/gradtrace/__main__.py"])  # python -m gradtrace
    with pytest.raises(SystemExit) as info:
        main(["fit", "--help"])
    assert info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert help_text.startswith("usage: gradtrace [options] fit ")
    assert "Shipped configs (--config NAME): arch/googlenet" in help_text
    assert "--debug shows the traceback of a user error" in help_text
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    overview = " ".join(capsys.readouterr().out.split())
    assert list(COMMANDS) == [
        "fit",
        "validate",
        "test",
        "predict",
        "summary",
        "compare",
        "probe",
        "coord-check",
    ]
    for command, sentence in COMMANDS.items():  # whole sentences, none cut off
        assert sentence[0].isupper(), sentence
        assert sentence.endswith("."), sentence
        assert f" {command} {sentence} " in overview
