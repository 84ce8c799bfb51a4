"""Ready for a GPU cluster: on a (faked) 8-GPU machine, ``gradtrace fit``, the demo and Table 1
run on one device unless asked, and say in one line how to use the others; with two or more
real GPUs, a 2-GPU DDP sweep cell with SyncBatchNorm measures the gradients of its first step as
one GPU does with the same global batch."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from gradtrace.cli.trainer_cli import GradtraceCLI
from gradtrace.measure import read_history
from gradtrace.studies import demo, short_run
from gradtrace.studies.table1 import reproduce
from gradtrace.sweeps import commands
from gradtrace.sweeps.agents import gpu_groups
from gradtrace.sweeps.grid import gradtrace_args
from gradtrace.sweeps.launch import run_cells
from helpers.distributed import needs_gpus

FIT_NOTE = (
    "gradtrace: 8 GPUs visible, using 1; --trainer.devices=8 runs DDP over 8 with the same "
    "global batch"
)
EIGHT = "0,1,2,3,4,5,6,7"


@pytest.fixture
def eight_gpus(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """What torch reports on an 8-GPU node (nothing here builds anything on CUDA)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    caplog.set_level(logging.INFO)


def gpu_notes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "GPUs visible" in r.getMessage()]


class _Parsed(Exception):
    def __init__(self, settings: Any) -> None:
        self.settings = settings


class _ParseOnlyCLI(GradtraceCLI):
    """Parses and does what GradtraceCLI does before building (the note), then stops."""

    def _set_seed(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        raise _Parsed(self._settings())


def resolved(args: Sequence[str]) -> Any:
    """The settings ``gradtrace <args>`` runs with (``args`` start with the subcommand)."""
    with pytest.raises(_Parsed) as parsed:
        _ParseOnlyCLI(args=list(args))
    return parsed.value.settings


class _TrainerBuilt(Exception):
    pass


def record_trainers(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of every Trainer the short runs build; building one stops."""
    built: list[dict[str, Any]] = []

    def trainer(**kwargs: Any) -> None:
        built.append(kwargs)
        raise _TrainerBuilt

    monkeypatch.setattr(short_run.pl, "Trainer", trainer)
    return built


# ------------------------------------------------------------------------------------------
# One device unless asked


@pytest.mark.usefixtures("eight_gpus")
def test_fit_runs_on_one_device_and_says_how_to_use_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert str(resolved(["fit"]).trainer.devices) == "1"
    assert gpu_notes(caplog) == [FIT_NOTE]
    caplog.clear()
    assert str(resolved(["fit", "--trainer.devices=8"]).trainer.devices) == "8"
    assert str(resolved(["fit", "--trainer.devices=auto"]).trainer.devices) == "auto"
    resolved(["fit", "--trainer.accelerator=cpu"])
    assert gpu_notes(caplog) == []  # asked for: nothing to say


@pytest.mark.usefixtures("eight_gpus")
def test_the_note_comes_from_rank_zero_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    resolved(["fit"])
    assert gpu_notes(caplog) == []


def test_no_note_with_one_gpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    caplog.set_level(logging.INFO)
    assert str(resolved(["fit"]).trainer.devices) == "1"
    assert gpu_notes(caplog) == []


@pytest.mark.usefixtures("eight_gpus")
def test_the_demo_trains_on_one_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    built = record_trainers(monkeypatch)
    with pytest.raises(_TrainerBuilt):
        demo.main(["--synthetic", "--steps", "1", "--out", str(tmp_path)])
    assert built[0]["devices"] == 1
    assert (
        "gradtrace: 8 GPUs visible, using 1; the demo's runs are small and go one after the "
        f"other; `make sweep-local SWEEP=sweeps/table1.yaml GPUS={EIGHT}` runs a grid one run "
        "per GPU"
    ) in capsys.readouterr().out.splitlines()


@pytest.mark.usefixtures("eight_gpus")
def test_the_table1_smoke_budget_trains_on_one_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    built = record_trainers(monkeypatch)
    with pytest.raises(_TrainerBuilt):
        reproduce.main(["--budget", "smoke", "--synthetic", "--steps", "2", "--batch-size", "4",
                     "--root", str(tmp_path)])  # fmt: skip
    assert built[0]["devices"] == 1
    assert gpu_notes(caplog) == [
        "gradtrace: 8 GPUs visible, using 1; the smoke budget runs in process; the full "
        f"budget's --gpus {EIGHT} (make reproduce-table1 GPUS={EIGHT}) runs one row per GPU"
    ]


@pytest.mark.usefixtures("eight_gpus")
def test_the_table1_full_budget_runs_each_row_on_one_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    launched = []

    def run_cells(runs: list[tuple[Path, list[str]]], gpus: Sequence[str] = ()) -> None:
        launched.append((runs, gpus))
        raise KeyboardInterrupt

    monkeypatch.setattr(reproduce, "run_cells", run_cells)
    assert reproduce.main(["--root", str(tmp_path), "--out", str(tmp_path / "report")]) == 130
    assert gpu_notes(caplog) == [
        f"gradtrace: 8 GPUs visible, using 1; --gpus {EIGHT} (make reproduce-table1 "
        f"GPUS={EIGHT}) runs one row per GPU"
    ]
    [(runs, pool)] = launched
    assert pool == []  # one row after the other
    assert len(runs) == 7
    for _, command in runs:
        assert str(resolved(gradtrace_args(command)).trainer.devices) == "1"


# ------------------------------------------------------------------------------------------
# A DDP cell on GPUs


# BN in every block, so that SyncBatchNorm (which with_ddp sets) is what makes the 2-GPU run
# equal to one GPU; SGD, so that the first update is the gradient itself.
BN_CELL = """\
name: ddp-bn
method: grid
metric: {name: val/acc, goal: maximize}
command: ["${env}", "${interpreter}", -m, gradtrace, fit, --model.arch=coursework_vgg,
          --model.depth=8, --model.batch_norm=true, --model.optimizer=sgd,
          --data.batch_size=32, --trainer.devices=1, "${args}"]
parameters:
  model.lr: {values: [0.01]}
"""
FIRST_STEP = [
    "--data.dataset=synthetic",
    "--data.synthetic_sizes=[256, 32]",
    "--data.val_size=32",
    "--trainer.max_steps=1",
    "--trainer.limit_val_batches=0",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.accelerator=gpu",
    "--trainer.callbacks+=gradtrace.GradientFlow",
    "--trainer.callbacks.every_n_steps=1",
    "--trainer.callbacks.plot=false",
]
# Every rank runs this (Lightning relaunches the script for rank 1): fp32 matmuls and
# convolutions, no TF32, so that only the summation order differs between the two runs.
FP32_CLI = """
import sys

import torch

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
from gradtrace.cli.main import main

main(sys.argv[1:])
"""


@pytest.mark.gpu
@pytest.mark.slow
@needs_gpus(2)
@pytest.mark.integration
def test_a_2_gpu_ddp_cell_with_sync_batchnorm_measures_what_one_gpu_does(tmp_path: Path) -> None:
    path = tmp_path / "cell.yaml"
    path.write_text(BN_CELL)
    script = tmp_path / "fp32_cli.py"
    script.write_text(FP32_CLI)
    runs = {}
    for name, processes, pool in (("one", 1, ["0"]), ("ddp", 2, gpu_groups(["0", "1"], 2))):
        _, [(run_dir, command)] = commands.local_runs(
            path, ddp=processes, root=tmp_path / name, overrides=FIRST_STEP, use_wandb=False
        )
        fp32_command = [sys.executable, str(script), *gradtrace_args(command)]
        [result] = run_cells([(run_dir, fp32_command)], gpus=pool, echo=lambda _: None)
        assert result.status == "done", (run_dir / "launch.log").read_text()[-3000:]
        runs[name] = run_dir
    config = yaml.safe_load((runs["ddp"] / "config.yaml").read_text())
    assert str(config["trainer"]["devices"]) == "2"
    assert config["trainer"]["sync_batchnorm"] is True
    assert config["data"]["batch_size"] == 32  # global: 16 per GPU
    one = read_history(runs["one"] / "gradient_flow.csv")
    ddp = read_history(runs["ddp"] / "gradient_flow.csv")
    assert {r["step"] for r in one} == {0}  # the first step only
    assert len(one) >= 8  # every conv layer at least
    assert [(r["step"], r["layer"]) for r in ddp] == [(r["step"], r["layer"]) for r in one]
    for a, b in zip(one, ddp):
        assert b["mean_abs"] == pytest.approx(a["mean_abs"], rel=1e-4), a["layer"]
        assert b["l2"] == pytest.approx(a["l2"], rel=1e-4), a["layer"]
