"""The ``gradtrace`` command: fit/validate/test on synthetic data, configs, resume, summary."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from gradtrace.cli import (
    GradtraceCLI,
    default_precision,
    default_run_name,
    find_last_checkpoint,
    list_configs,
    main,
    resolve_config,
)
from gradtrace.gradient_flow import GradientFlow, read_history

# Small synthetic data: 10 classes, 180 training images, 20 validation, 50 test.
SMALL = [
    "--data.dataset=synthetic",
    "--data.synthetic_sizes=[200, 50]",
    "--data.val_size=20",
    "--data.batch_size=10",
]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def last_value(rows: list[dict[str, str]], key: str) -> float:
    return float([r[key] for r in rows if r.get(key)][-1])


def test_the_sweep_command_from_the_issue_runs(tmp_path: Path) -> None:
    main(
        [
            "fit",
            "--model.arch", "vgg",
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
    run = tmp_path / "vgg38-bn-rc-synthetic-lr0.01" / "version_0"
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
    probabilities = torch.load(tmp_path / "r/version_2/predictions.pt")
    assert probabilities.shape == (50, 10)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(50))
    # Every invocation logs into a new version; the checkpoint is found in version_0.
    assert find_last_checkpoint(tmp_path / "r") == tmp_path / "r/version_0/checkpoints/last.ckpt"
    assert (tmp_path / "r" / "version_1" / "metrics.csv").is_file()


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
    assert [type(lg).__name__ for lg in cli.trainer.loggers] == ["CSVLogger"]


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


def test_wandb_offline_logger_under_an_agent(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cli = GradtraceCLI(
        args=[*SMALL, "--model.arch=vgg08", f"--trainer.default_root_dir={tmp_path}"], run=False
    )
    assert [type(lg).__name__ for lg in cli.trainer.loggers] == ["CSVLogger", "WandbLogger"]
    assert cli.trainer.log_dir == str(tmp_path / "vgg08-synthetic-lr0.001" / "version_0")


@pytest.mark.parametrize(
    ("cuda", "bf16", "config", "expected"),
    [
        (True, True, {}, "bf16-mixed"),
        (True, True, {"accelerator": "gpu"}, "bf16-mixed"),
        (True, True, {"precision": "32-true"}, None),
        (True, True, {"accelerator": "cpu"}, None),
        (True, False, {}, None),
        (False, False, {}, None),
    ],
)
def test_bf16_is_the_default_only_on_a_cuda_gpu_that_has_it(
    monkeypatch, cuda: bool, bf16: bool, config: dict, expected: str | None
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert default_precision(config) == expected


def test_default_run_names() -> None:
    model = {"arch": "vgg", "depth": 8, "lr": 0.001}
    assert default_run_name(model, {"dataset": "cifar100"}) == "vgg08-cifar100-lr0.001"
    model = {"arch": "vgg", "depth": 38, "batch_norm": True, "residual": True, "lr": 0.01}
    assert default_run_name(model, {"dataset": "cifar100"}) == "vgg38-bn-rc-cifar100-lr0.01"
    model = {"arch": "resnet56", "activation": None, "lr": 0.1}
    assert default_run_name(model, {"dataset": "imagefolder:/x"}) == "resnet56-imagefolder-lr0.1"


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
        "arch": "vgg",
        "depth": 38,
        "batch_norm": True,
        "residual": True,
        "optimizer": "adam",
        "lr": 0.01,
        "scheduler": "cosine",
    }
    assert row7["data"]["batch_size"] == 100
    assert row7["trainer"]["max_epochs"] == 100


def test_unknown_config_lists_the_shipped_ones() -> None:
    with pytest.raises(SystemExit, match="no config file 'table1/vgg99'; shipped configs: arch/"):
        resolve_config("table1/vgg99")


def test_bad_model_option_fails_before_training(tmp_path: Path, capsys) -> None:
    root = f"--trainer.default_root_dir={tmp_path}"
    with pytest.raises(SystemExit):
        main(["fit", *SMALL, "--model.arch=vgg", "--model.depth=37", root])
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
    assert "--option expects KEY=VALUE, got 'width'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["summary", "--arch", "vgg37"])
    assert "unknown model 'vgg37'; closest: vgg38" in capsys.readouterr().err


class CrashAtStep(pl.Callback):
    """Simulates a fault (a killed job) once training reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated fault")


def test_resumed_run_ends_like_an_uninterrupted_one(tmp_path: Path) -> None:
    # 18 steps per epoch, 3 epochs; the fault hits in the middle of the third epoch.
    args = [*SMALL, *QUIET, "--model.arch=vgg08", "--trainer.max_epochs=3", "--run_name=r"]
    args += ["--trainer.log_every_n_steps=5"]
    main(["fit", *args, f"--trainer.default_root_dir={tmp_path / 'straight'}"])
    faulty = [*args, f"--trainer.default_root_dir={tmp_path / 'faulty'}"]
    crash = ["--trainer.callbacks+=test_cli.CrashAtStep", "--trainer.callbacks.step=45"]
    with pytest.raises(RuntimeError, match="simulated fault"):
        GradtraceCLI(args=["fit", *faulty, *crash])
    main(["fit", *faulty, "--ckpt_path=last"])

    straight = torch.load(find_last_checkpoint(tmp_path / "straight/r"), weights_only=False)
    resumed = torch.load(find_last_checkpoint(tmp_path / "faulty/r"), weights_only=False)
    assert resumed["global_step"] == straight["global_step"] == 54
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0)
    final = metrics_rows(tmp_path / "straight/r/version_0")
    after = metrics_rows(tmp_path / "faulty/r/version_1")
    for key in ("val/loss", "val/acc", "train/loss"):
        assert last_value(after, key) == last_value(final, key)
    # Nothing measured before the fault was lost: the first version kept its files.
    before = tmp_path / "faulty/r/version_0"
    assert max(r["step"] for r in read_history(before / "gradient_flow.csv")) >= 40


DDP_SCRIPT = """
import sys
from gradtrace.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_cpu_ddp_matches_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    script = tmp_path / "run_cli.py"
    script.write_text(DDP_SCRIPT)
    common = [
        "fit",
        "--data.dataset=synthetic",
        "--data.synthetic_sizes=[200, 50]",
        "--data.val_size=20",
        # No BatchNorm (its per-rank batch statistics differ from the global batch's, and
        # SyncBatchNorm needs GPUs) and no dropout (per-rank random masks).
        "--model.arch=vgg11",
        "--model.arch_kwargs={head: cifar, dropout: 0.0}",
        "--trainer.max_epochs=1",
        "--trainer.accelerator=cpu",
        "--trainer.callbacks+=gradtrace.GradientFlow",
        "--trainer.callbacks.every_n_steps=1",
        "--run_name=r",
        *QUIET,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {
        "single": ["--trainer.devices=1", "--data.batch_size=20"],
        "ddp": ["--trainer.devices=2", "--trainer.strategy=ddp", "--data.batch_size=10"],
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
    # Only rank 0 wrote: one version directory.
    assert [p.name for p in ddp.iterdir()] == ["version_0"]
    flow_single = read_history(single / "version_0/gradient_flow.csv")
    flow_ddp = read_history(ddp / "version_0/gradient_flow.csv")
    assert [(r["step"], r["layer"]) for r in flow_ddp] == [
        (r["step"], r["layer"]) for r in flow_single
    ]
    for a, b in zip(flow_single, flow_ddp):
        assert b["mean_abs"] == pytest.approx(a["mean_abs"], rel=1e-3, abs=1e-9)
        assert b["l2"] == pytest.approx(a["l2"], rel=1e-3, abs=1e-9)
    rows_single = metrics_rows(single / "version_0")
    rows_ddp = metrics_rows(ddp / "version_0")
    for key in ("val/loss", "val/acc", "train/loss"):
        assert last_value(rows_ddp, key) == pytest.approx(last_value(rows_single, key), rel=1e-4)
