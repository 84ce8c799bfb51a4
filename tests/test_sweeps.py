"""The W&B sweeps: every file expands as W&B's engine does, every grid cell parses and trains
a step, cells land in their own run directories as an agent launches them, the agent's exact
command line, DDP cells, ``sweep local`` (failures, reruns, GPU pool) and ``sweep agents``
(sweep ids, failed agents, pinning, stopping process groups)."""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradtrace.cli.main import main as cli_main
from gradtrace.cli.trainer_cli import run_directory
from gradtrace.sweeps import agents, commands, launch, outcome
from gradtrace.sweeps.agents import gpu_groups, launch_agents, sweep_path
from gradtrace.sweeps.grid import (
    Cell,
    Shard,
    SweepConfigError,
    agent_command,
    expand,
    gradtrace_args,
    load_sweep,
    validate,
    with_ddp,
)
from gradtrace.sweeps.launch import (
    PORT_RANGE,
    Interrupted,
    ProcessGroups,
    final_metrics,
    free_port,
    parse_gpus,
    run_cells,
)

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "sweeps"
EXPECTED_RUNS = {
    "table1": 16,  # depth {8, 38} x BN x RC x lr {1e-3, 1e-2}
    "depth": 48,  # 6 x 2 x 2 x 2
    "architectures": 34,  # 17 models x {CIFAR-10, CIFAR-100}
    "stabilizers": 36,  # 3 inits x 6 activations x clipping {off, 1.0}
    "vgg_cifar10": 6,  # L2 {0, 1e-4, 5e-4} x momentum {0, 0.9}
    "normalization": 8,  # norm {none, batch, group, layer} x residual
}
# Tiny synthetic data, one step, no validation, no checkpoint files, no plots.
TINY = [
    "--data.dataset=synthetic",
    "--data.synthetic_sizes=[8, 4]",
    "--data.val_size=2",
    "--data.batch_size=2",
    "--data.augment=false",
    "--trainer.max_steps=1",
    "--trainer.limit_val_batches=0",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.accelerator=cpu",
    "--trainer.callbacks=[{class_path: gradtrace.GradientFlow, init_args: {plot: false}}, "
    "{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_top_k: 0}}]",
]
# Parameters whose values only change a number or the dataset that TINY replaces: cells that
# differ only in these train the same code path, so one of them runs (all are expanded).
SAME_PATH = {"model.lr", "data.dataset"}


def sweep_config(name: str) -> dict[str, Any]:
    return load_sweep(SWEEPS / f"{name}.yaml")


def fixed_args(config: dict[str, Any]) -> list[str]:
    """The command's own arguments after ``gradtrace fit`` (without the output folder)."""
    command = [str(c) for c in config["command"]]
    start = command.index("fit") + 1
    return [
        arg
        for arg in command[start:]
        if arg != "${args}" and not arg.startswith("--trainer.default_root_dir")
    ]


def grid_cells() -> list[tuple[str, Cell, list[str]]]:
    """One representative ``(sweep, cell, CLI args)`` per distinct code path over all files."""
    seen, out = set(), []
    for name in EXPECTED_RUNS:
        config = sweep_config(name)
        for cell in expand(config):
            key = (
                tuple(a for a in fixed_args(config) if not a.startswith("--trainer.callbacks")),
                tuple((k, repr(v)) for k, v in cell.params.items() if k not in SAME_PATH),
            )
            if key not in seen:
                seen.add(key)
                command = agent_command(config, cell)
                out.append((name, cell, command[command.index("fit") :]))
    return out


def cell_id(cell: Cell) -> str:
    return ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in cell.params.items())


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "arch_kwargs":
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ------------------------------------------------------------------------------------------
# Files, schema, expansion


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.stem)
def test_the_grid_expansion_equals_the_wandb_engine(path: Path) -> None:
    engine = pytest.importorskip("sweeps")  # test environment only (it pins numpy < 2)
    config = load_sweep(path)
    proposed: list[Any] = []
    while (run := engine.next_run(dict(config), proposed)) is not None:
        proposed.append(run)
    cells = expand(config)
    assert [c.config for c in cells] == [dict(run.config) for run in proposed]
    assert [list(c.config) for c in cells] == [list(run.config) for run in proposed]
    assert engine.schema_violations_from_proposed_config(dict(config)) == []


def test_the_expansion_keeps_wandb_order_and_drops_repeated_values() -> None:
    config = {
        "method": "grid",
        "command": ["${args}"],
        "parameters": {
            "b": {"values": [1, 2.0, 2, 1]},  # 2.0 and 2 are one value (last one kept)
            "a": {"values": ["x", "y"]},
            "c": {"value": {"k": 1}},
        },
    }
    assert [c.params for c in expand(config)] == [
        {"a": "x", "b": 1, "c": {"k": 1}},
        {"a": "x", "b": 2, "c": {"k": 1}},
        {"a": "y", "b": 1, "c": {"k": 1}},
        {"a": "y", "b": 2, "c": {"k": 1}},
    ]


@pytest.mark.parametrize("name", sorted(EXPECTED_RUNS))
def test_sweep_file_expands_to_the_full_grid(name: str) -> None:
    raw = yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())
    assert raw["method"] == "grid"
    assert raw["metric"] == {"name": "val/acc", "goal": "maximize"}
    assert [str(c) for c in raw["command"][:5]] == [
        "${env}",
        "${interpreter}",
        "-m",
        "gradtrace",
        "fit",
    ]
    assert raw["command"][-1] == "${args}"
    cells = expand(raw)
    assert len(cells) == EXPECTED_RUNS[name]
    # The grid is the full product of the files' values (independently computed).
    values = {key: spec["values"] for key, spec in raw["parameters"].items()}
    expected = {
        json.dumps(dict(zip(values, combo)), sort_keys=True)
        for combo in itertools.product(*values.values())
    }
    assert {json.dumps(c.params, sort_keys=True) for c in cells} == expected


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_sweep_pins_one_device_and_fp32_per_run(path: Path) -> None:
    # Unpinned, a run under `wandb agent` would take every visible GPU (devices=auto: DDP).
    command = load_sweep(path)["command"]
    assert "--trainer.devices=1" in command
    assert "--trainer.precision=32-true" in command


def test_the_directory_holds_exactly_the_six_sweeps() -> None:
    assert sorted(p.stem for p in SWEEPS.glob("*.yaml")) == sorted(EXPECTED_RUNS)


@pytest.mark.parametrize("name", ["table1", "depth"])
def test_coursework_sweeps_use_the_shipped_table1_hyperparameters(name: str) -> None:
    # Every setting of configs/table1/vgg38-bn-rc.yaml, other than the run's name and the
    # swept model knobs, is set the same way by the sweep's fixed arguments.
    from gradtrace.cli.configs import CONFIG_DIR

    shipped = flat(yaml.safe_load((CONFIG_DIR / "table1" / "vgg38-bn-rc.yaml").read_text()))
    config = sweep_config(name)
    fixed = {}
    for arg in fixed_args(config):
        key, _, value = arg.removeprefix("--").partition("=")
        fixed[key] = yaml.safe_load(value)
    swept = set(config["parameters"])
    for key, value in shipped.items():
        if key in ("seed_everything", "trainer.callbacks") or key in swept:
            continue
        assert fixed.get(key) == value, key


def test_stabilizers_switch_clipping_off_with_zero_and_the_cli_reads_it_as_no_clipping() -> None:
    values = sweep_config("stabilizers")["parameters"]["trainer.gradient_clip_val"]["values"]
    assert values == [0.0, 1.0]
    # Lightning clips only when the value is > 0.
    from lightning.pytorch.plugins.precision import Precision

    class Optimizer:
        param_groups = [{"params": []}]

    calls = []
    precision = Precision()
    precision.clip_grad_by_norm = lambda *a: calls.append(a)  # type: ignore[method-assign]
    precision.clip_gradients(Optimizer(), clip_val=0.0)  # type: ignore[arg-type]
    assert calls == []
    precision.clip_gradients(Optimizer(), clip_val=1.0)  # type: ignore[arg-type]
    assert len(calls) == 1


def test_agent_command_is_what_wandb_agent_builds() -> None:
    config = sweep_config("table1")
    cell = next(
        c
        for c in expand(config)
        if c.params == {"model.depth": 38, "model.batch_norm": True, "model.residual": False,
                        "model.lr": 0.01}
    )  # fmt: skip
    command = agent_command(config, cell)
    assert command[:5] == ["/usr/bin/env", "python", "-m", "gradtrace", "fit"]
    # wandb's create_sweep_command_args: --key=str(value), the engine's (sorted) order.
    assert command[-4:] == [
        "--model.batch_norm=True",
        "--model.depth=38",
        "--model.lr=0.01",
        "--model.residual=False",
    ]
    assert agent_command(config, cell, interpreter="/x/python")[1] == "/x/python"


def test_mapping_parameters_become_yaml_mappings_on_the_command_line() -> None:
    config = sweep_config("architectures")
    cell = next(c for c in expand(config) if c.params["model"].get("aux_logits") is None
                and c.params["model"].get("arch_kwargs", {}).get("aux_logits") is False
                and c.params["data.dataset"] == "cifar10")  # fmt: skip
    command = agent_command(config, cell)
    model_arg = next(a for a in command if a.startswith("--model={"))
    assert yaml.safe_load(model_arg.split("=", 1)[1]) == cell.params["model"]


def test_invalid_sweeps_are_refused_with_every_problem_listed(tmp_path: Path) -> None:
    bad = {
        "method": "grid",
        "command": ["${env}", "${interpreter}", "-m", "gradtrace", "fit"],
        "parameters": {"model.depth": {"values": [8, 38]}, "model.lr": {"values": []}},
    }
    with pytest.raises(SweepConfigError) as err:
        validate({**bad, "method": "exhaustive"}, source="bad.yaml")
    message = str(err.value)
    assert message.startswith("bad.yaml is not a valid W&B sweep:")
    assert "method must be one of grid, random, bayes; got 'exhaustive'" in message
    assert "parameter 'model.lr': values must be a non-empty list" in message
    assert "command must be a list containing '${args}'" in message
    path = tmp_path / "s.yaml"
    path.write_text("method: [grid\n")
    with pytest.raises(SweepConfigError, match=r"s\.yaml is not valid YAML"):
        load_sweep(path)
    with pytest.raises(SweepConfigError, match="no sweep file"):
        load_sweep(tmp_path / "missing.yaml")
    with pytest.raises(SweepConfigError, match="only grid sweeps can be expanded"):
        expand({**bad, "method": "random"})
    unknown = {
        "method": "grid",
        "parameters": {"model.depth": {"values": [8]}},
        "command": ["${args_json_file}", "${args}"],
    }
    with pytest.raises(SweepConfigError, match=r"command macro \$\{args_json_file\} is not"):
        agent_command(unknown, expand(unknown)[0])


def test_parse_gpus() -> None:
    assert parse_gpus("0,1,2,3") == ["0", "1", "2", "3"]
    assert parse_gpus(None) == []
    assert parse_gpus("") == []
    with pytest.raises(ValueError, match="comma-separated list such as 0,1,2,3; got '0,,1'"):
        parse_gpus("0,,1")
    assert gpu_groups(["0", "1", "2", "3"], 2) == ["0,1", "2,3"]
    with pytest.raises(ValueError, match="do not split into groups of 2"):
        gpu_groups(["0", "1", "2"], 2)


def test_a_gpu_repeats_across_runs_but_not_within_one_ddp_run() -> None:
    assert gpu_groups(["0", "0", "1", "1"], 1) == ["0", "0", "1", "1"]  # two runs per GPU
    assert gpu_groups(["0", "1", "0", "1"], 2) == ["0,1", "0,1"]  # two DDP runs on 0 and 1
    with pytest.raises(ValueError) as err:
        gpu_groups(["0", "0", "1", "1"], 2)
    assert str(err.value) == (
        "GPUs 0,0,1,1 with DDP over 2: the group 0,0 lists GPU 0 more than once; each DDP run "
        "needs 2 different GPUs (a GPU may repeat in different groups: two runs then share it)"
    )
    with pytest.raises(ValueError, match="the group 1,01 lists GPU 1 more than once"):
        gpu_groups(["1", "01"], 2)  # one GPU to CUDA_VISIBLE_DEVICES


@pytest.mark.parametrize("action", ["local", "agents"])
def test_duplicate_gpus_in_a_ddp_run_stop_the_command_with_one_line(
    action: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import wandb

    monkeypatch.setattr(commands, "local_runs", lambda *a, **k: pytest.fail("no cell is parsed"))
    monkeypatch.setattr(wandb, "sweep", lambda *a, **k: pytest.fail("must not create"))
    argv = [action, str(SWEEPS / "table1.yaml"), "--gpus", "0,0,1,1", "--ddp", "2"]
    assert commands.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "error: GPUs 0,0,1,1 with DDP over 2: the group 0,0 lists GPU 0 more than once; each "
        "DDP run needs 2 different GPUs (a GPU may repeat in different groups: two runs then "
        "share it)"
    ]


def test_sweep_ids_as_wandb_shows_them() -> None:
    assert sweep_path("abc", "p") == "p/abc"
    assert sweep_path("abc", "p", "team") == "team/p/abc"
    assert sweep_path("q/abc", "p", "team") == "team/q/abc"
    assert sweep_path("ent/q/abc", "p", "team") == "ent/q/abc"
    with pytest.raises(ValueError, match="ID, project/ID or entity/project/ID; got 'a/b/c/d'"):
        sweep_path("a/b/c/d", "p")


def test_ddp_cells_keep_the_global_batch() -> None:
    config = sweep_config("table1")
    ddp = with_ddp(config, 4)
    command = ddp["command"]
    # The command keeps the global batch; the CLI splits it (tests/test_cli.py).
    assert "--data.batch_size=100" in command
    assert "--trainer.devices=1" not in command
    assert command[-4:] == [
        "--trainer.devices=4",
        "--trainer.strategy=ddp",
        "--trainer.sync_batchnorm=true",
        "${args}",
    ]
    assert config["command"] != command  # the file's config is left alone
    with pytest.raises(SweepConfigError, match="global batch 100 does not split into 3"):
        with_ddp(config, 3)
    swept = {**config, "parameters": {"data.batch_size": {"values": [64, 100]}}}
    with pytest.raises(SweepConfigError, match="global batch 100 does not split into 8"):
        with_ddp(swept, 8)


# ------------------------------------------------------------------------------------------
# Every cell runs


@pytest.mark.parametrize(
    ("name", "cell", "args"),
    [pytest.param(*c, id=f"{c[0]}:{cell_id(c[1])}") for c in grid_cells()],
)
def test_every_grid_cell_parses_and_trains_one_step(
    name: str, cell: Cell, args: list[str], tmp_path: Path
) -> None:
    cli_main([*args, *TINY, f"--trainer.default_root_dir={tmp_path}"])
    (run,) = tmp_path.iterdir()
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["step"] for r in rows if r.get("train/loss")] == ["0"]  # one step, trained
    config = flat(yaml.safe_load((run / "config.yaml").read_text()))
    for key, value in cell.params.items():
        if key == "data.dataset":
            continue  # replaced by TINY's synthetic data
        if isinstance(value, dict):
            for sub, sub_value in value.items():
                assert config[f"{key}.{sub}"] == sub_value, (key, sub)
        else:
            assert config[key] == value, key


def test_only_cells_differing_in_lr_or_dataset_share_a_run() -> None:
    # table1's 16 cells are depth's depth-8/38 cells (same fixed arguments but the folder),
    # depth's 48 differ in lr by pairs, architectures' 34 in the dataset by pairs.
    # table1 also records every non-bias weight for the report's gradient-flow figures.
    flow = [
        "--trainer.callbacks+=gradtrace.GradientFlow",
        '--trainer.callbacks.include=["*.weight"]',
    ]
    assert fixed_args(sweep_config("table1")) == fixed_args(sweep_config("depth")) + flow
    ran = grid_cells()
    assert len(ran) == 16 // 2 + (48 - 16) // 2 + 34 // 2 + 36 + 6 + 8
    assert {n for n, _, _ in ran} == set(EXPECTED_RUNS)


def stabilizer_cells() -> tuple[dict[str, Any], Cell, Cell]:
    """Two cells of stabilizers.yaml that differ only in gradient clipping."""
    config = sweep_config("stabilizers")
    cells = [
        c
        for c in expand(config)
        if c.params["model.init"] == "kaiming" and c.params["model.activation"] == "relu"
    ]
    off, on = sorted(cells, key=lambda c: c.params["trainer.gradient_clip_val"])
    return config, off, on


def test_two_cells_differing_only_in_clipping_land_in_two_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, off, on = stabilizer_cells()
    root = f"--trainer.default_root_dir={tmp_path}"
    # Without an agent the settings' hash tells them apart ...
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    dirs = {run_directory([*gradtrace_args(agent_command(config, c)), root]) for c in (off, on)}
    assert len(dirs) == 2
    # ... and launched as `wandb agent` launches them (its environment, its ${args}, W&B
    # disabled), each trains into its own directory, named by the W&B run id.
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep1")
    for run_id, cell in (("run-off", off), ("run-on", on)):
        monkeypatch.setenv("WANDB_RUN_ID", run_id)
        cli_main([*gradtrace_args(agent_command(config, cell)), *TINY, root])
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name.rsplit("-", 2)[-2:] for p in runs] == [["run", "off"], ["run", "on"]]
    clips = [
        yaml.safe_load((p / "config.yaml").read_text())["trainer"]["gradient_clip_val"]
        for p in runs
    ]
    assert clips == [0.0, 1.0]
    assert all((p / "metrics.csv").is_file() for p in runs)


def test_cells_that_would_share_a_run_directory_are_refused(tmp_path: Path) -> None:
    # The progress bar is not part of a run's identity: both cells are the same run.
    path = tmp_path / "same.yaml"
    path.write_text(
        'method: grid\ncommand: ["${env}", "${interpreter}", -m, gradtrace, fit, "${args}"]\n'
        "parameters:\n  trainer.enable_progress_bar: {values: [true, false]}\n"
    )
    with pytest.raises(SweepConfigError, match="two cells would share the run directory"):
        commands.local_runs(path, root=tmp_path)


@pytest.mark.slow
@pytest.mark.integration
def test_the_exact_agent_command_line_runs_in_a_subprocess(tmp_path: Path) -> None:
    config = sweep_config("table1")
    cell = next(c for c in expand(config) if c.params["model.batch_norm"]
                and c.params["model.residual"] and c.params["model.depth"] == 38)  # fmt: skip
    command = agent_command(config, cell)  # /usr/bin/env python -m gradtrace fit ...
    env = dict(os.environ)
    # What the agent relies on: `python` on PATH is the environment's interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(
        [*command, *TINY, f"--trainer.default_root_dir={tmp_path}", "--run_name=agent"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    config_yaml = yaml.safe_load((tmp_path / "agent/config.yaml").read_text())
    assert config_yaml["model"]["batch_norm"] is True
    assert config_yaml["model"]["residual"] is True
    assert config_yaml["model"]["depth"] == 38
    assert config_yaml["model"]["lr"] == cell.params["model.lr"]
    assert config_yaml["data"]["batch_size"] == 2  # TINY, appended last, wins


# ------------------------------------------------------------------------------------------
# sweep local


TWO_CELLS = """\
name: two
method: grid
metric: {name: val/acc, goal: maximize}
command: ["${env}", "${interpreter}", -m, gradtrace, fit, --model.arch=coursework_vgg, "${args}"]
parameters:
  model.depth: {values: [8, 9]}   # 9 is not 8 + 6b: that cell fails
"""
SMALL_RUN = [
    "--data.dataset=synthetic",
    "--data.synthetic_sizes=[40, 10]",
    "--data.val_size=10",
    "--data.batch_size=10",
    "--trainer.max_steps=3",
    "--trainer.enable_progress_bar=false",
]


def sweep_local_subprocess(path: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python -m gradtrace.sweeps local`` as a user starts it: all it prints, captured."""
    return subprocess.run(
        [sys.executable, "-m", "gradtrace.sweeps", "local", str(path), "--root", str(root),
         *extra, "--", *SMALL_RUN],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.integration
def test_sweep_local_prints_one_line_per_run_and_the_failed_runs_error_then_skips_on_rerun(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(TWO_CELLS)
    root = tmp_path / "runs"
    _, planned = commands.local_runs(path, root=root, overrides=SMALL_RUN)
    (good, _), (bad, _) = planned
    assert good.name.startswith("vgg08-synthetic-lr0.001-")
    assert bad.name.startswith("vgg09-synthetic-lr0.001-")

    done = sweep_local_subprocess(path, root)
    assert done.returncode == 1
    # The failed run's error, read independently: the CLI's one error line in its log.
    bad_log = (bad / "launch.log").read_text()
    [error] = [line for line in bad_log.splitlines() if line.startswith("gradtrace: error: ")]
    assert "depth must be 8 + 6*b" in error
    logs = f"{root}/<run>/launch.log"
    lines = done.stdout.splitlines()
    assert len(lines) == 5, done.stdout
    assert lines[0] == (
        f"{path}: 2 runs, one after the other, under {root} (each run's output: {logs})"
    )
    assert re.fullmatch(rf"\[1/2\] {good.name}: done in \d+ s, val/acc \d\.\d{{4}}", lines[1])
    assert re.fullmatch(rf"\[2/2\] {bad.name}: failed \(exit 2\) after \d+ s: (.*)", lines[2])
    assert lines[2].endswith(f" s: {error}")
    assert lines[3] == f"{path}: 1 done, 1 failed; logs: {logs}"
    assert lines[4] == f"W&B offline runs: upload them with `wandb sync {root}/*/wandb/offline-*`"
    assert done.stderr == ""  # no warnings, no progress bars, no banners: all in the logs
    assert "Epoch" not in done.stdout
    assert "Data: synthetic: " in (good / "launch.log").read_text()  # the run's output

    assert not (bad / "done.json").exists()
    record = json.loads((good / "done.json").read_text())
    assert record["exit_code"] == 0
    assert record["command"][-len(SMALL_RUN) :] == SMALL_RUN
    assert "--ckpt_path=last" not in record["command"]  # nothing to resume the first time
    last_val = [
        float(r["val/acc"])
        for r in csv.DictReader((good / "metrics.csv").open())
        if r.get("val/acc")
    ][-1]
    assert record["metrics"]["val/acc"] == pytest.approx(last_val)
    assert lines[1].endswith(f"val/acc {last_val:.4f}")
    assert not any("grad_flow" in k for k in record["metrics"])
    # W&B logged offline in the run's own directory.
    assert list((good / "wandb").glob("offline-run-*"))

    argv = ["local", str(path), "--root", str(root), "--", *SMALL_RUN]
    assert commands.main(argv) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"[1/2] {good.name}: skipped: finished earlier"
    assert lines[2].endswith(f" s: {error}")
    assert lines[3] == f"{path}: 0 done, 1 failed, 1 skipped (finished earlier); logs: {logs}"
    assert (bad / "launch.log").read_text().count("$ /usr/bin/env") == 2
    # An unfinished cell with a checkpoint resumes from it.
    (good / "done.json").unlink()
    _, planned = commands.local_runs(path, root=root, overrides=SMALL_RUN)
    assert planned[0][1][-1] == "--ckpt_path=last"
    assert "--ckpt_path=last" not in planned[1][1]


# Children standing in for runs: what each prints, and how it ends.
FINISHES = "print('Epoch 0: 100%|##########| 2/2')"
RAISES = """
import sys
sys.stdout.write('Epoch 0:  50%|#####     | 1/2\\rEpoch 0: 100%|##########| 2/2\\n')
sys.stdout.flush()
try:
    raise KeyError('batch')
except KeyError as err:
    raise RuntimeError('loss is nan at step 3') from err
"""
CLEANS_UP_AFTER_ITS_ERROR = """
import sys
print('gradtrace: error: --data.root /nope holds no cifar-100-python.tar.gz', file=sys.stderr)
print('wandb: Synced 0 files')
print()
sys.exit(2)
"""
KILLED = "import os, signal; print('Epoch 0: 1/2'); os.kill(os.getpid(), signal.SIGKILL)"


def test_each_run_ends_in_one_line_with_its_status_and_its_last_error_line(
    tmp_path: Path,
) -> None:
    python = sys.executable
    runs = [
        (tmp_path / "finishes", [python, "-c", FINISHES]),
        (tmp_path / "resumes", [python, "-c", FINISHES, launch.RESUME_ARGUMENT]),
        (tmp_path / "raises", [python, "-c", RAISES]),
        (tmp_path / "cleans-up", [python, "-c", CLEANS_UP_AFTER_ITS_ERROR]),
        (tmp_path / "killed", [python, "-c", KILLED]),
        (tmp_path / "finished-before", [python, "-c", "raise SystemExit(5)"]),
    ]
    (tmp_path / "finished-before").mkdir()
    (tmp_path / "finished-before" / "done.json").write_text('{"metrics": {"val/acc": 0.5}}')
    # The error of an earlier launch of the same run is not this launch's.
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "launch.log").write_text("$ earlier\nValueError: earlier launch\n")
    messages: list[str] = []
    results = run_cells(runs, echo=messages.append)
    assert [r.status for r in results] == ["done", "done", "failed", "failed", "failed", "skipped"]
    seconds = [re.sub(r"\d+ s", "N s", m) for m in messages]
    assert seconds == [
        "[1/6] finishes: done in N s",
        "[2/6] resumes: resumed, done in N s",
        "[3/6] raises: failed (exit 1) after N s: RuntimeError: loss is nan at step 3",
        "[4/6] cleans-up: failed (exit 2) after N s: "
        "gradtrace: error: --data.root /nope holds no cifar-100-python.tar.gz",
        f"[5/6] killed: failed (killed by SIGKILL) after N s: no error line in "
        f"{tmp_path / 'killed' / 'launch.log'}",
        "[6/6] finished-before: skipped: finished earlier",
    ]
    assert "Epoch 0: 100%" in (tmp_path / "raises" / "launch.log").read_text()  # kept there
    assert outcome.summary_line("grid", results, "LOGS") == (
        "grid: 2 done, 3 failed, 1 skipped (finished earlier); logs: LOGS"
    )
    assert outcome.summary_line("grid", results[:2], "LOGS") == "grid: 2 done, 0 failed; logs: LOGS"


@pytest.mark.parametrize(
    ("log", "error"),
    [
        ("Traceback (most recent call last):\n  File \"x.py\", line 1\n    raise KeyError\n"
         "KeyError: 'a'\n\nThe above exception was the direct cause of the following "
         "exception:\n\ntorch.OutOfMemoryError: CUDA out of memory\n\n",
         "torch.OutOfMemoryError: CUDA out of memory"),
        ("[rank1]: Traceback (most recent call last):\n[rank1]: ValueError: bad shape\n"
         "Epoch 0:  20%|##        | 1/5\r\n", "[rank1]: ValueError: bad shape"),
        ("step 1\nKeyboardInterrupt\n", "KeyboardInterrupt"),
        ("\x1b[1;34mwandb\x1b[0m: \x1b[31mERROR\x1b[0m Sweep not found\nwandb: Agent exiting\n",
         "wandb: ERROR Sweep not found"),
        ("Epoch 0: 100%|##########| 2/2\nMy Errors: none\nerrors: 0\n", None),
    ],
    ids=["chained-traceback", "ddp-rank", "bare-exception", "wandb", "none"],
)  # fmt: skip
def test_the_last_error_line_of_a_log(tmp_path: Path, log: str, error: str | None) -> None:
    path = tmp_path / "launch.log"
    path.write_text(log)
    assert outcome.last_error_line(path) == error
    assert outcome.log_mentions(path, "wandb: ERROR") == (error == "wandb: ERROR Sweep not found")
    # from a byte offset on: an earlier launch's lines are not read
    assert outcome.last_error_line(path, start=len(log.encode())) is None
    assert outcome.last_error_line(tmp_path / "missing.log") is None


def test_sweep_local_dry_run_prints_the_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(TWO_CELLS)
    monkeypatch.chdir(tmp_path)
    override = "--trainer.max_steps=1"
    assert commands.main(["local", str(path), "--dry-run", "--no-wandb", "--", override]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        f"{path}: 2 runs, one after the other, under runs/sweeps/two "
        "(each run's output: runs/sweeps/two/<run>/launch.log)"
    )
    run_dir = run_directory(["fit", "--model.arch=coursework_vgg", "--model.depth=8", override,
                             "--trainer.default_root_dir=runs/sweeps/two"])  # fmt: skip
    assert lines[1] == (
        f"{run_dir.name}: /usr/bin/env {sys.executable} -m gradtrace fit "
        "--model.arch=coursework_vgg --model.depth=8 "
        f"--trainer.default_root_dir=runs/sweeps/two {override}"
    )
    assert not (tmp_path / "runs").exists()


def test_sweep_local_refuses_overrides_it_sets_itself(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(TWO_CELLS)
    for override in ("--trainer.default_root_dir=x", "--run_name=x"):
        with pytest.raises(ValueError, match="give the output folder with --root"):
            commands.run_local(path, overrides=[override], dry_run=True)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 48, 50])
def test_the_shards_of_a_grid_partition_it(count: int) -> None:
    cells = [json.dumps(c.params, sort_keys=True) for c in expand(sweep_config("depth"))]
    assert len(cells) == len(set(cells)) == 48
    shards = [Shard(index, count).select(cells) for index in range(count)]
    assert sorted(cell for shard in shards for cell in shard) == sorted(cells)  # union, once
    for index, shard in enumerate(shards):
        assert shard == [cell for i, cell in enumerate(cells) if i % count == index]
    assert str(Shard.parse(f" {count - 1}/{count} ")) == f"{count - 1}/{count}"


@pytest.mark.parametrize("value", ["2/2", "-1/2", "1", "a/b", "1/0", "0/2/4", ""])
def test_a_bad_shard_stops_the_command_with_one_line_before_any_work(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(commands, "local_runs", lambda *a, **k: pytest.fail("no cell is parsed"))
    assert commands.main(["local", str(SWEEPS / "table1.yaml"), f"--shard={value}"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"error: --shard expects K/N with 0 <= K < N; got {value!r}"
    ]


FIVE_CELLS = """\
name: five
method: grid
command: ["${env}", "${interpreter}", -m, gradtrace, fit, --model.arch=coursework_vgg, "${args}"]
parameters:
  model.lr: {values: [0.1, 0.2, 0.3, 0.4, 0.5]}
"""


def test_sweep_local_hands_only_its_shard_to_the_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "five.yaml"
    path.write_text(FIVE_CELLS)
    root = tmp_path / "runs"
    _, grid = commands.local_runs(path, root=root, use_wandb=False)
    launched: list[list[tuple[Path, list[str]]]] = []

    def launcher(runs: list[tuple[Path, list[str]]], **kwargs: Any) -> list[Any]:
        launched.append(list(runs))
        return [outcome.LaunchResult(d.name, outcome.DONE, d / "launch.log") for d, _ in runs]

    monkeypatch.setattr(commands, "run_cells", launcher)
    argv = ["local", str(path), "--root", str(root), "--no-wandb", "--shard", "1/2"]
    assert commands.main(argv) == 0
    assert launched == [[grid[1], grid[3]]]  # cells 1 and 3 of 0..4
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{path}: shard 1/2: 2 of 5 runs, one after the other, under ")
    assert lines[-1] == f"{path}: 2 done, 0 failed; logs: {root}/<run>/launch.log"


@pytest.mark.integration
def test_the_gpu_pool_runs_one_cell_per_gpu_at_a_time(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import json, os, sys, time
        start = time.time(); time.sleep(0.6)
        record = {"gpu": os.environ["CUDA_VISIBLE_DEVICES"], "start": start, "end": time.time()}
        open(sys.argv[1], "w").write(json.dumps(record))
        """
    )
    cells = [
        (tmp_path / "root" / f"c{i}", [sys.executable, "-c", script, str(tmp_path / f"c{i}.json")])
        for i in range(4)
    ]
    results = run_cells(cells, gpus=["a", "b"], echo=lambda _: None)
    assert [r.status for r in results] == ["done"] * 4
    records = [json.loads((tmp_path / f"c{i}.json").read_text()) for i in range(4)]
    assert sorted(r["gpu"] for r in records) == ["a", "a", "b", "b"]
    for gpu in "ab":  # the two cells on one GPU never overlap
        first, second = sorted((r for r in records if r["gpu"] == gpu), key=lambda r: r["start"])
        assert first["end"] <= second["start"]
    # two cells ran at the same time (one per GPU)
    moments = [r["start"] + 0.3 for r in records]
    assert max(sum(r["start"] <= t <= r["end"] for r in records) for t in moments) == 2
    assert all((tmp_path / "root" / f"c{i}" / "done.json").is_file() for i in range(4))


@pytest.mark.integration
def test_cells_running_at_once_get_their_own_master_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MASTER_PORT", "29500")  # inherited: shared by every cell, the bug
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    # launched inside an outer job (srun, torchrun): its ranks are not the cell's
    outer = {"SLURM_NTASKS": "8", "SLURM_PROCID": "3", "LOCAL_RANK": "3", "RANK": "3"}
    for key, value in outer.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_JOB_ID", "1234")  # not a rank: kept
    script = textwrap.dedent(
        """
        import json, os, sys, time
        start = time.time(); time.sleep(0.6)
        record = {"addr": os.environ["MASTER_ADDR"], "port": int(os.environ["MASTER_PORT"]),
                  "start": start, "end": time.time(),
                  "outer": sorted(k for k in os.environ if k in sys.argv[2:]),
                  "job": os.environ.get("SLURM_JOB_ID")}
        open(sys.argv[1], "w").write(json.dumps(record))
        """
    )
    cells = [
        (
            tmp_path / "root" / f"c{i}",
            [sys.executable, "-c", script, str(tmp_path / f"c{i}.json"), *outer],
        )
        for i in range(4)
    ]
    results = run_cells(cells, gpus=["a", "b"], echo=lambda _: None)
    assert [r.status for r in results] == ["done"] * 4
    records = [json.loads((tmp_path / f"c{i}.json").read_text()) for i in range(4)]
    assert {r["addr"] for r in records} == {"127.0.0.1"}  # every DDP process runs here
    assert all(r["outer"] == [] and r["job"] == "1234" for r in records)
    assert all(r["port"] in PORT_RANGE for r in records)
    overlapping = [
        (a, b)
        for a, b in itertools.combinations(records, 2)
        if a["start"] < b["end"] and b["start"] < a["end"]
    ]
    assert overlapping  # two at a time
    assert all(a["port"] != b["port"] for a, b in overlapping)


def test_free_port_skips_ports_in_use_and_ports_handed_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("", 0))
        listener.listen()
        port = listener.getsockname()[1]
        monkeypatch.setattr(launch, "PORT_RANGE", range(port, port + 1))
        with pytest.raises(RuntimeError, match=f"no free TCP port in {port}-{port}"):
            free_port()
    assert free_port() == port  # closed: free again
    with pytest.raises(RuntimeError, match="no free TCP port"):
        free_port(taken={port})


def test_final_metrics_are_the_last_finite_values_but_per_layer_ones(tmp_path: Path) -> None:
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,val/acc,val/loss,grad_flow/mean_abs/x\n0,0,0.5,2.0,1\n1,1,0.7,,1\n1,2,nan,,\n"
    )
    assert final_metrics(tmp_path) == {"val/acc": 0.7, "val/loss": 2.0}
    assert final_metrics(tmp_path / "missing") == {}


GRANDCHILD = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                         start_new_session=True)  # as `wandb agent` starts its runs
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds descendants through /proc")
@pytest.mark.integration
def test_stopping_reaches_children_in_process_groups_of_their_own(tmp_path: Path) -> None:
    groups = ProcessGroups()
    pid_file = tmp_path / "grandchild"
    parent = groups.start([sys.executable, "-c", GRANDCHILD, str(pid_file)])
    for _ in range(200):
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    assert os.getpgid(grandchild) != os.getpgid(parent.pid)
    groups.stop(grace=1)  # under xdist the children ignore SIGINT: killed after the grace
    assert parent.returncode is not None
    for _ in range(100):
        if not alive(grandchild):
            break
        time.sleep(0.05)
    assert not alive(grandchild)
    with pytest.raises(Interrupted):
        groups.start([sys.executable, "-c", "pass"])


# ------------------------------------------------------------------------------------------
# sweep agents


FAKE_WANDB = """\
#!{python}
import json, os, sys
out = os.path.join({folder!r}, "agent-" + os.environ.get("CUDA_VISIBLE_DEVICES", "none"))
json.dump({{"argv": sys.argv[1:], "path0": os.environ["PATH"].split(os.pathsep)[0],
           "port": int(os.environ["MASTER_PORT"])}}, open(out + ".json", "w"))
print("wandb: Starting wandb agent")  # a run's output, too, goes to the agent's log
if os.environ.get("CUDA_VISIBLE_DEVICES") == {error!r}:
    print("wandb: ERROR Sweep not found")  # and exit 0, as `wandb agent` does
    print("wandb: Agent exiting")
if os.environ.get("CUDA_VISIBLE_DEVICES") == {fail!r}:
    print("RuntimeError: the agent died")
    sys.exit(3)
"""


def fake_wandb(folder: Path, fail: str | None = None, error: str | None = None) -> str:
    exe = folder / "wandb"
    exe.write_text(
        FAKE_WANDB.format(python=sys.executable, folder=str(folder), fail=fail, error=error)
    )
    exe.chmod(0o755)
    return str(exe)


@pytest.mark.integration
def test_agents_create_the_sweep_and_start_one_agent_per_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import wandb

    monkeypatch.chdir(tmp_path)  # the agents' logs go under runs/sweeps/table1/
    created = []
    monkeypatch.setattr(
        wandb, "sweep", lambda config, project, entity: created.append(config) or "abc123"
    )
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")  # inherited, would be shared by both agents
    messages: list[str] = []
    executable = fake_wandb(tmp_path)
    code = launch_agents(
        SWEEPS / "table1.yaml",
        gpus=["0", "1"],
        project="p",
        count=2,
        wandb_executable=executable,
        echo=messages.append,
    )
    assert code == 0
    assert created == [yaml.safe_load((SWEEPS / "table1.yaml").read_text())]
    records = [json.loads((tmp_path / f"agent-{gpu}.json").read_text()) for gpu in "01"]
    for record in records:
        assert record["argv"] == ["agent", "--count", "2", "p/abc123"]
        assert record["path0"] == str(Path(sys.executable).parent)
        assert record["port"] in PORT_RANGE
    assert records[0]["port"] != records[1]["port"]  # each agent's (DDP) runs have their own
    logs = "runs/sweeps/table1/agent-<n>.log"
    assert messages[0] == (
        f"sweep p/abc123: 2 agent(s) on GPUs 0 1: {executable} agent --count 2 "
        f"p/abc123 (output: {logs})"
    )
    assert sorted(re.sub(r"\d+ s", "N s", m) for m in messages[1:3]) == [
        "[1/2] agent 1 on GPU 0: done in N s",
        "[2/2] agent 2 on GPU 1: done in N s",
    ]
    assert messages[3:] == [f"sweep p/abc123: 2 done, 0 failed; logs: {logs}"]
    assert capfd.readouterr().out == ""  # the agents' output is in their logs
    for n in (1, 2):
        log = (tmp_path / "runs" / "sweeps" / "table1" / f"agent-{n}.log").read_text()
        assert log.endswith("wandb: Starting wandb agent\n")


@pytest.mark.integration
def test_agents_report_a_failed_agent_and_join_an_existing_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    monkeypatch.setattr(wandb, "sweep", lambda *a, **k: pytest.fail("must not create"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.chdir(tmp_path)
    messages: list[str] = []
    code = launch_agents(
        SWEEPS / "depth.yaml",
        gpus=["0", "1"],
        entity="team",
        sweep_id="xyz",
        wandb_executable=fake_wandb(tmp_path, fail="1"),
        echo=messages.append,
    )
    assert code == 1
    lines = [re.sub(r"\d+ s", "N s", m) for m in messages]
    assert "[2/2] agent 2 on GPU 1: failed (exit 3) after N s: RuntimeError: the agent died" in (
        lines
    )
    assert lines[-1] == "sweep team/gradtrace/xyz: 1 done, 1 failed; logs: " + (
        "runs/sweeps/depth/agent-<n>.log"
    )
    assert json.loads((tmp_path / "agent-0.json").read_text())["argv"] == [
        "agent",
        "team/gradtrace/xyz",
    ]


@pytest.mark.integration
def test_an_agent_that_reports_an_error_and_exits_0_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.chdir(tmp_path)
    messages: list[str] = []
    code = launch_agents(
        SWEEPS / "depth.yaml",
        gpus=["0"],
        sweep_id="ent/proj/xyz",
        wandb_executable=fake_wandb(tmp_path, error="0"),
        echo=messages.append,
    )
    assert code == 1
    assert re.sub(r"\d+ s", "N s", messages[1]) == (
        "[1/1] agent 1 on GPU 0: failed (exit 0) after N s: wandb: ERROR Sweep not found"
    )
    assert json.loads((tmp_path / "agent-0.json").read_text())["argv"] == ["agent", "ent/proj/xyz"]


def test_unpinned_agents_are_refused_where_several_gpus_are_visible(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(agents, "visible_gpus", lambda: 4)
    with pytest.raises(RuntimeError, match=r"4 GPUs are visible .* GPUS=0,1,2,3"):
        launch_agents(SWEEPS / "table1.yaml", wandb_executable="unused")


def test_agents_refuse_offline_mode_and_invalid_files_before_touching_wandb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    monkeypatch.setattr(wandb, "sweep", lambda *a, **k: pytest.fail("must not create"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(RuntimeError, match="WANDB_MODE=offline: W&B agents need the W&B server"):
        launch_agents(SWEEPS / "table1.yaml", wandb_executable="unused")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: grid\nparameters: {a: {values: [1]}}\ncommand: [x]\n")
    with pytest.raises(SweepConfigError, match="command must be a list containing"):
        launch_agents(bad, wandb_executable="unused")


def test_agents_turn_a_failed_sweep_creation_into_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import wandb

    def no_login(*args: Any, **kwargs: Any) -> str:
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "sweep", no_login)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(RuntimeError, match=r"It needs `wandb login` .* use `make sweep-local`"):
        launch_agents(SWEEPS / "table1.yaml", wandb_executable="unused")


def test_main_reports_errors_with_exit_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert commands.main(["show", str(tmp_path / "nope.yaml")]) == 2
    assert "error: no sweep file" in capsys.readouterr().err
    assert commands.main(["show", str(SWEEPS / "vgg_cifar10.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("vgg_cifar10.yaml: 6 runs")
    assert out[1].startswith("/usr/bin/env python -m gradtrace fit --model.arch=vgg_cifar10")
    with pytest.raises(SystemExit):
        commands.main(["agents", str(SWEEPS / "table1.yaml"), "--", "--x=1"])
    assert "overrides after `--` apply to `local` only" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# DDP cells


DDP_CELL = """\
name: ddp
method: grid
metric: {name: val/acc, goal: maximize}
command: ["${env}", "${interpreter}", -m, gradtrace, fit, --model.arch=vgg11,
          "--model.arch_kwargs={head: cifar, dropout: 0.0}", --model.optimizer=sgd,
          --data.batch_size=20,
          --trainer.devices=1, "${args}"]
parameters:
  model.lr: {values: [0.001]}
"""


@pytest.mark.slow
@pytest.mark.integration
def test_a_ddp_cell_matches_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    # The model and settings of tests/test_cli.py's DDP test, through a sweep cell.
    from helpers.cli_runs import DDP_EQUALITY_OVERRIDES, assert_same_training

    path = tmp_path / "ddp.yaml"
    path.write_text(DDP_CELL)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, processes in (("single", 1), ("ddp", 2)):
        _, [(run_dir, command)] = commands.local_runs(
            path,
            ddp=processes,
            root=tmp_path / name,
            overrides=DDP_EQUALITY_OVERRIDES,
            use_wandb=False,
        )
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = run_dir
    config = yaml.safe_load((runs["ddp"] / "config.yaml").read_text())
    # The global batch as given, split by the CLI into 10 per process.
    assert (config["data"]["batch_size"], str(config["trainer"]["devices"])) == (20, "2")
    assert config["trainer"]["strategy"] == "ddp"
    assert_same_training(runs["single"], runs["ddp"])


TWO_DDP_CELLS = """\
name: two-ddp
method: grid
metric: {name: val/acc, goal: maximize}
command: ["${env}", "${interpreter}", -m, gradtrace, fit, --model.arch=coursework_vgg,
          --trainer.devices=1, "${args}"]
parameters:
  model.lr: {values: [0.001, 0.01]}
"""


@pytest.mark.slow
@pytest.mark.integration
def test_two_ddp_cells_at_once_both_finish_despite_an_inherited_rendezvous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two 2-process gloo cells side by side, as `sweep local --gpus a,b,c,d --ddp 2` runs
    # them, under a MASTER_PORT both would inherit: on one port the second cell's rank 0
    # cannot bind, or its ranks join the first cell's group.
    path = tmp_path / "two.yaml"
    path.write_text(TWO_DDP_CELLS)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    # inside an outer job: with its LOCAL_RANK a cell would not start its second process
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    overrides = [*TINY, "--trainer.sync_batchnorm=false"]  # SyncBatchNorm needs GPUs
    root = tmp_path / "runs"
    _, runs = commands.local_runs(path, ddp=2, root=root, overrides=overrides, use_wandb=False)
    messages: list[str] = []
    groups = ProcessGroups()
    slots = gpu_groups(["a", "b", "c", "d"], 2)
    results: list[Any] = []

    def launch() -> None:
        results.extend(run_cells(runs, gpus=slots, echo=messages.append, groups=groups))

    def both_running() -> bool:
        return all(
            (run_dir / "launch.log").is_file() and not (run_dir / "done.json").is_file()
            for run_dir, _ in runs
        )

    launcher = threading.Thread(target=launch)
    launcher.start()
    deadline = time.monotonic() + 240
    ran_together = False
    while launcher.is_alive() and time.monotonic() < deadline:
        ran_together = ran_together or both_running()
        time.sleep(0.05)
    if launcher.is_alive():
        groups.stop(grace=1)
        launcher.join()
        pytest.fail(f"the DDP cells hung: {messages}")
    logs = [(run_dir / "launch.log").read_text()[-2000:] for run_dir, _ in runs]
    assert [r.status for r in results] == ["done", "done"], logs
    assert ran_together  # both had started before either finished
    assert [m.split(": ", 1)[1].split(" in ")[0] for m in sorted(messages)] == ["done", "done"]
    for run_dir, _ in runs:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert (str(config["trainer"]["devices"]), config["trainer"]["strategy"]) == ("2", "ddp")
        rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
        assert [r["step"] for r in rows if r.get("train/loss")] == ["0"]  # it trained its step


def test_no_user_facing_extra_pins_numpy_or_needs_the_sweep_engine() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for name, requirements in extras.items():
        if name == "dev":
            continue
        for requirement in requirements:
            assert not requirement.startswith(("sweeps", "numpy")), (name, requirement)
