"""The ``gradtrace`` command: fit/validate/test on synthetic data, configs, resume, summary."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gradtrace.classifier import ImageClassifier
from gradtrace.cli.configs import list_configs, resolve_config
from gradtrace.cli.errors import UserError
from gradtrace.cli.main import main
from gradtrace.cli.run_identity import ResumeCheckpoint, config_hash, readable_prefix, run_name
from gradtrace.cli.trainer_cli import GradtraceCLI, last_checkpoint, run_directory
from gradtrace.gradient_flow import GradientFlow
from gradtrace.measure import read_history
from helpers.cli_runs import (
    DDP_EQUALITY_OVERRIDES,
    QUIET,
    assert_same_training,
    last_value,
    metrics_rows,
)

# Small synthetic data: 10 classes, 180 training images, 20 validation, 50 test.
SMALL = [
    "--data.dataset=synthetic",
    "--data.synthetic_sizes=[200, 50]",
    "--data.val_size=20",
    "--data.batch_size=10",
]


def only_run(root: Path) -> Path:
    """The one run directory under ``root``."""
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    return run


def test_the_sweep_command_from_the_issue_runs(tmp_path: Path) -> None:
    main(
        [
            "fit",
            "--model.arch", "coursework_vgg",
            "--model.depth", "38",
            "--model.batch_norm", "true",
            "--model.residual", "true",
            "--model.lr", "0.01",
            "--data.dataset", "synthetic",
            "--trainer.max_steps", "20",
            *SMALL[1:],
            "--trainer.log_every_n_steps=5",
            *QUIET,
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )  # fmt: skip
    run = only_run(tmp_path)
    assert run.name.startswith("vgg38-bn-rc-synthetic-lr0.01-")
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints",
        "config.yaml",
        "gradient_flow",
        "gradient_flow.csv",
        "hparams.yaml",
        "metrics.csv",
    ]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["depth"] == 38
    assert config["model"]["lr"] == 0.01
    rows = metrics_rows(run)
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "lr-Adam"} <= set(rows[0])
    history = read_history(run / "gradient_flow.csv")
    layers = [r["layer"] for r in history if r["step"] == 0]
    assert layers[0] == "net.stem.0.weight"
    assert layers[-1] == "net.head.weight"
    assert not [layer for layer in layers if layer.endswith("bias")]
    # The 38 conv/linear weights; BatchNorm weights and biases only when included.
    assert len(layers) == 38
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "checkpoints").glob("best-*.ckpt"))) == 1


def test_test_and_predict_from_the_last_checkpoint(tmp_path: Path, capsys) -> None:
    common = [*SMALL, *QUIET, f"--trainer.default_root_dir={tmp_path}", "--run_name=r"]
    main(["fit", "--model.arch=vgg08", "--trainer.max_epochs=1", *common])
    main(["test", "--model.arch=vgg08", "--ckpt_path=last", *common])
    assert "test/acc" in capsys.readouterr().out
    main(["predict", "--model.arch=vgg08", "--ckpt_path=last", *common])
    # One directory for the run: fit, test and predict all write there.
    probabilities = torch.load(tmp_path / "r/predictions.pt")
    assert probabilities.shape == (50, 10)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(50))
    assert last_checkpoint(tmp_path / "r") == tmp_path / "r/checkpoints/last.ckpt"
    assert [p.name for p in tmp_path.iterdir()] == ["r"]
    assert "test/acc" in metrics_rows(tmp_path / "r")[0] or any(
        r.get("test/acc") for r in metrics_rows(tmp_path / "r")
    )


def test_links_take_classes_and_channels_from_the_data(tmp_path: Path) -> None:
    cli = GradtraceCLI(
        args=[
            "--data.dataset=synthetic",
            "--data.num_classes=7",
            "--data.channels=1",
            "--data.synthetic_sizes=[100, 20]",
            "--data.val_size=10",
            "--data.batch_size=10",
            "--model.arch=vgg08",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    assert cli.model.hparams.num_classes == 7
    assert cli.model.hparams.in_chans == 1
    assert cli.model.net.head.out_features == 7
    callbacks = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"GradientFlow", "ModelCheckpoint", "LearningRateMonitor"} <= callbacks
    assert [type(lg).__name__ for lg in cli.trainer.loggers] == ["RunCSVLogger"]
    assert cli.trainer.precision == "32-true"


@pytest.mark.parametrize(
    ("devices", "eval_batch", "per_process"),
    [("1", None, (20, 20)), ("2", None, (10, 10)), ("2", "30", (10, 15)), ("4", "40", (5, 10))],
)
def test_the_batch_sizes_are_global_and_split_over_the_processes(
    devices: str, eval_batch: str | None, per_process: tuple[int, int], tmp_path: Path
) -> None:
    # Built, not run: a CPU DDP Trainer knows its processes before it starts any.
    cli = GradtraceCLI(
        args=[
            *SMALL[:-1],
            "--data.batch_size=20",
            *([f"--data.eval_batch_size={eval_batch}"] if eval_batch else []),
            "--model.arch=vgg08",
            "--trainer.accelerator=cpu",
            f"--trainer.devices={devices}",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    assert cli.trainer.world_size == int(devices)
    assert (cli.datamodule.batch_size, cli.datamodule.eval_batch_size) == per_process
    assert cli.config.data.batch_size == 20  # the run's config keeps what was asked for


def test_user_callbacks_replace_the_defaults_of_their_type(tmp_path: Path) -> None:
    cli = GradtraceCLI(
        args=[
            *SMALL,
            "--model.arch=vgg08",
            "--trainer.callbacks+=gradtrace.GradientFlow",
            "--trainer.callbacks.every_n_steps=3",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    flows = [c for c in cli.trainer.callbacks if isinstance(c, GradientFlow)]
    assert len(flows) == 1
    assert flows[0].every_n_steps == 3


def test_a_users_model_checkpoint_keeps_the_resume_checkpoint(tmp_path: Path) -> None:
    cli = GradtraceCLI(
        args=[
            *SMALL,
            "--model.arch=vgg08",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.monitor=val/loss",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    checkpoints = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert [type(c).__name__ for c in checkpoints] == ["ModelCheckpoint", "ResumeCheckpoint"]
    assert checkpoints[0].monitor == "val/loss"
    assert isinstance(checkpoints[1], ResumeCheckpoint)
    assert checkpoints[1].filename == "last"


def test_wandb_offline_logger_under_an_agent(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cli = GradtraceCLI(
        args=[*SMALL, "--model.arch=vgg08", f"--trainer.default_root_dir={tmp_path}"], run=False
    )
    monkeypatch.setenv("WANDB_RUN_ID", "run42")
    cli = GradtraceCLI(
        args=[*SMALL, "--model.arch=vgg08", f"--trainer.default_root_dir={tmp_path}"], run=False
    )
    assert [type(lg).__name__ for lg in cli.trainer.loggers] == ["RunCSVLogger", "WandbLogger"]
    # Under an agent the W&B run id names the directory: no version_N below it.
    assert Path(cli.trainer.log_dir) == tmp_path / "vgg08-synthetic-lr0.001-run42"


def test_readable_prefixes() -> None:
    model = {"arch": "coursework_vgg", "depth": 8, "lr": 0.001}
    assert readable_prefix(model, {"dataset": "cifar100"}) == "vgg08-cifar100-lr0.001"
    model = {
        "arch": "coursework_vgg",
        "depth": 38,
        "batch_norm": True,
        "residual": True,
        "lr": 0.01,
    }
    assert readable_prefix(model, {"dataset": "cifar100"}) == "vgg38-bn-rc-cifar100-lr0.01"
    model = {"arch": "resnet56", "activation": None, "lr": 0.1}
    assert readable_prefix(model, {"dataset": "imagefolder:/x"}) == "resnet56-imagefolder-lr0.1"
    model = {"arch": "vgg38", "norm": "group", "lr": 0.001}
    assert readable_prefix(model, {"dataset": "cifar100"}) == "vgg38-group-cifar100-lr0.001"


def test_run_names_tell_apart_what_the_prefix_does_not() -> None:
    base = {
        "seed_everything": 0,
        "model": {"arch": "vgg38", "lr": 0.001, "weight_decay": 0.0},
        "data": {"dataset": "cifar100"},
        "trainer": {"gradient_clip_val": None, "default_root_dir": "runs", "callbacks": None},
    }
    clipped = {**base, "trainer": {**base["trainer"], "gradient_clip_val": 1.0}}
    decayed = {**base, "model": {**base["model"], "weight_decay": 5e-4}}
    watched = [
        {"class_path": "gradtrace.GradientFlow", "init_args": {"every_n_steps": 5}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"},
        {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar"},
    ]
    elsewhere = {
        **base,
        "trainer": {**base["trainer"], "default_root_dir": "/x", "callbacks": watched},
        "ckpt_path": "last",
    }
    early_stop = {"class_path": "lightning.pytorch.callbacks.EarlyStopping"}
    stopped = {**base, "trainer": {**base["trainer"], "callbacks": [*watched, early_stop]}}
    names = {run_name(c, env={}) for c in (base, clipped, decayed, stopped)}
    assert len(names) == 4
    assert all(n.startswith("vgg38-cifar100-lr0.001-") for n in names)
    # Where it is saved, the callbacks that only watch or save it and the checkpoint it
    # resumes from are not the run; a callback that changes training (early stopping) is.
    assert config_hash(elsewhere) == config_hash(base)
    agent = {"WANDB_SWEEP_ID": "s1", "WANDB_RUN_ID": "abc"}
    assert run_name(base, env=agent) == "vgg38-cifar100-lr0.001-abc"
    assert run_name(base, env={"WANDB_RUN_ID": "abc"}) == run_name(base, env={})


def test_run_directory_is_the_cli_own_and_follows_the_resolved_settings(tmp_path: Path) -> None:
    root = f"--trainer.default_root_dir={tmp_path}"
    flags = run_directory(["fit", "--model.arch=vgg08", "--model.lr=0.01", root])
    spelled = run_directory(["fit", "--model.arch", "vgg08", "--model.lr", "1e-2", root])
    clipped = run_directory(
        ["fit", "--model.arch=vgg08", "--model.lr=0.01", root, "--trainer.gradient_clip_val=1"]
    )
    assert flags == spelled
    assert flags != clipped
    assert flags.parent == tmp_path
    cli = GradtraceCLI(args=["--model.arch=vgg08", "--model.lr=0.01", root], run=False)
    assert cli.run_dir == flags
    # What Lightning writes into its root on its own (SLURM's hpc_ckpt_N.ckpt) stays in the run.
    assert cli.trainer.default_root_dir == str(flags)


def test_every_shipped_config_parses(capsys) -> None:
    names = list_configs()
    table1 = [n for n in names if n.startswith("table1/")]
    assert len(table1) == 7
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            GradtraceCLI(args=["--config", name, "--print_config"], run=False)
        assert exit_info.value.code == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert (
            printed["model"]["arch"]
            == yaml.safe_load(Path(resolve_config(name)).read_text())["model"]["arch"]
        )
    row7 = yaml.safe_load(Path(resolve_config("table1/vgg38-bn-rc-lr1e-2")).read_text())
    assert row7["model"] == {
        "arch": "coursework_vgg",
        "depth": 38,
        "batch_norm": True,
        "residual": True,
        "optimizer": "adam",
        "lr": 0.01,
        "lr_min": 2e-5,
        "scheduler": "cosine",
    }
    assert row7["data"]["batch_size"] == 100
    assert row7["trainer"]["max_epochs"] == 100


def test_table1_print_config_states_precision_cosine_floor_and_normalisation(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "table1/vgg38", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["precision"] == "32-true"
    assert printed["model"]["lr_min"] == 2e-5
    assert printed["data"]["normalization"] == "cifar10"
    (flow,) = printed["trainer"]["callbacks"]
    assert flow["class_path"] == "gradtrace.GradientFlow"
    assert flow["init_args"]["include"] == ["*.weight"]


def test_unknown_config_lists_the_shipped_ones() -> None:
    with pytest.raises(UserError, match="no config file 'table1/vgg99'; shipped configs: arch/"):
        resolve_config("table1/vgg99")


def test_bad_model_option_fails_before_training(tmp_path: Path, capsys) -> None:
    root = f"--trainer.default_root_dir={tmp_path}"
    with pytest.raises(SystemExit):
        main(["fit", *SMALL, "--model.arch=coursework_vgg", "--model.depth=37", root])
    assert "nearest valid: 32, 38" in capsys.readouterr().err
    assert not (tmp_path / "vgg37-synthetic-lr0.001").exists()


def test_summary_prints_the_lecture_rows(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", "--arch", "alexnet", "--input-size", "3", "227", "227"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    conv1 = next(line for line in out.splitlines() if "conv1" in line)
    assert "784.0" in conv1
    assert "23,296" in conv1
    assert "72.86" in conv1
    assert "61,100,840" in out


def test_summary_options_and_errors(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["summary", "--arch", "vgg38", "--option", "batch_norm=true", "--markdown"])
    assert "338,500" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", "--arch", "vgg38", "--option", "width"])
    assert exit_info.value.code == 2
    assert "gradtrace: error: --option expects KEY=VALUE; got 'width'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["summary", "--arch", "vgg37"])
    assert "unknown model 'vgg37'; closest: vgg38" in capsys.readouterr().err


def crash_at_step(step: int) -> Callable[..., Any]:
    """A ``training_step`` that simulates a fault (a killed job) once training reaches ``step``:
    patched into the model, not a callback, so the command line stays the one resumed."""
    original = ImageClassifier.training_step

    def training_step(self: ImageClassifier, *args: Any, **kwargs: Any) -> Any:
        if self.trainer.global_step == step:
            raise RuntimeError("simulated fault")
        return original(self, *args, **kwargs)

    return training_step


def test_resumed_run_ends_like_an_uninterrupted_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # 18 steps per epoch, 3 epochs; the fault hits in the middle of the third epoch. The
    # faulty run also has the user's own ModelCheckpoint, which must not cost the resume
    # checkpoint; no --run_name: the directory comes from the settings both times.
    args = [*SMALL, *QUIET, "--model.arch=vgg08", "--trainer.max_epochs=3"]
    args += ["--trainer.log_every_n_steps=5"]
    main(["fit", *args, f"--trainer.default_root_dir={tmp_path / 'straight'}"])
    faulty = [*args, f"--trainer.default_root_dir={tmp_path / 'faulty'}"]
    own = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.monitor=val/loss",
    ]
    with monkeypatch.context() as patch:
        patch.setattr(ImageClassifier, "training_step", crash_at_step(45))
        with pytest.raises(RuntimeError, match="simulated fault"):
            main(["fit", *faulty, *own])
    run = only_run(tmp_path / "faulty")
    logged_before = {int(r["step"]) for r in metrics_rows(run)}
    assert max(logged_before) >= 40  # the fault came after steps past the checkpoint (36)
    capsys.readouterr()
    main(["fit", *faulty, *own, "--ckpt_path=last"])
    assert only_run(tmp_path / "faulty") == run  # resumed in place
    # It says what it resumed from: the end of the second epoch (18 steps each).
    resumed_line = (
        f"gradtrace: resuming from {run}/checkpoints/last.ckpt (saved at epoch 1, step 36)"
    )
    assert resumed_line in capsys.readouterr().err.splitlines()

    straight_run = only_run(tmp_path / "straight")
    straight = torch.load(last_checkpoint(straight_run), weights_only=False)
    resumed = torch.load(last_checkpoint(run), weights_only=False)
    assert resumed["global_step"] == straight["global_step"] == 54
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0)

    # One continuous metrics.csv and gradient_flow.csv, as if nothing had happened.
    def steps(rows: list[dict]) -> list[tuple]:
        return [(int(r["step"]), sorted(k for k, v in r.items() if v)) for r in rows]

    assert steps(metrics_rows(run)) == steps(metrics_rows(straight_run))
    for key in ("val/loss", "val/acc", "train/loss"):
        assert last_value(metrics_rows(run), key) == last_value(metrics_rows(straight_run), key)
    flow = [(r["step"], r["layer"]) for r in read_history(run / "gradient_flow.csv")]
    assert flow == [
        (r["step"], r["layer"]) for r in read_history(straight_run / "gradient_flow.csv")
    ]


def test_a_fit_stopped_by_sigterm_does_not_read_as_finished(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What Lightning's loop raises once its SIGTERM handler has run (preemption, a job's time
    # limit): a SystemExit without a code, which used to end the command with status 0.
    def training_step(self: ImageClassifier, *args: Any, **kwargs: Any) -> Any:
        raise SIGTERMException

    monkeypatch.setattr(ImageClassifier, "training_step", training_step)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *SMALL, *QUIET, f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.splitlines()[-1] == (
        "gradtrace: stopped by SIGTERM before the end; rerun the same command with "
        "--ckpt_path last to resume from the last epoch's checkpoint"
    )


def test_ckpt_path_last_without_a_checkpoint_fails_clearly(tmp_path: Path, capsys) -> None:
    root = f"--trainer.default_root_dir={tmp_path}"
    for missing, message in (
        ("last", r"--ckpt_path last: no checkpoint at \S+/checkpoints/last\.ckpt \(this run "),
        ("nowhere.ckpt", r"--ckpt_path nowhere.ckpt: no such file; give `last` "),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *SMALL, *QUIET, "--model.arch=vgg08", f"--ckpt_path={missing}", root])
        assert exit_info.value.code == 2
        [line] = capsys.readouterr().err.splitlines()
        assert re.match("gradtrace: error: " + message, line)
    assert not list(tmp_path.rglob("metrics.csv"))  # stopped before training


DDP_SCRIPT = """
import sys
from gradtrace.cli.main import main
main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.integration
def test_cpu_ddp_matches_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    script = tmp_path / "run_cli.py"
    script.write_text(DDP_SCRIPT)
    common = [
        "fit",
        "--model.arch=vgg11",
        "--model.arch_kwargs={head: cifar, dropout: 0.0}",
        "--model.optimizer=sgd",
        "--run_name=r",
        *DDP_EQUALITY_OVERRIDES,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The same --data.batch_size: the CLI's batch is global, each of the 2 processes takes 10.
    runs = {
        "single": ["--trainer.devices=1", "--data.batch_size=20"],
        "ddp": ["--trainer.devices=2", "--trainer.strategy=ddp", "--data.batch_size=20"],
    }
    for name, extra in runs.items():
        root = tmp_path / name
        subprocess.run(
            [sys.executable, str(script), *common, *extra, f"--trainer.default_root_dir={root}"],
            check=True,
            env=env,
            capture_output=True,
            timeout=300,
        )
    single, ddp = tmp_path / "single/r", tmp_path / "ddp/r"
    # Only rank 0 wrote, into the run's one directory.
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
    assert_same_training(single, ddp)
