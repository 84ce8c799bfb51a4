"""The W&B sweeps: every file valid for W&B's engine, every grid cell parses and trains a
step, the agent's exact command line, ``sweep local`` (failures, reruns, GPU pool) and
``sweep agents`` (one agent per GPU)."""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradtrace.cli import main as cli_main
from gradtrace.experiments import sweep
from gradtrace.experiments.sweep import (
    Cell,
    SweepConfigError,
    agent_command,
    cell_name,
    expand,
    final_metrics,
    launch_agents,
    load_sweep,
    parse_gpus,
    run_cells,
    validate,
)

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "sweeps"
EXPECTED_RUNS = {
    "table1": 16,  # depth {8, 38} x BN x RC x lr {1e-3, 1e-2}
    "depth": 48,  # 6 x 2 x 2 x 2
    "architectures": 28,  # 14 models x {CIFAR-10, CIFAR-100}
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
                tuple(fixed_args(config)),
                tuple((k, repr(v)) for k, v in cell.params.items() if k not in SAME_PATH),
            )
            if key not in seen:
                seen.add(key)
                command = agent_command(config, cell)
                out.append((name, cell, command[command.index("fit") :]))
    return out


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


@pytest.mark.parametrize("name", sorted(EXPECTED_RUNS))
def test_sweep_file_is_valid_for_the_engine_and_expands_to_the_full_grid(name: str) -> None:
    raw = yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())
    assert sweep._engine().schema_violations_from_proposed_config(raw) == []
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
    # The engine's grid is the full product of the files' values (independently computed).
    values = {key: spec["values"] for key, spec in raw["parameters"].items()}
    expected = {
        json.dumps(dict(zip(values, combo)), sort_keys=True)
        for combo in itertools.product(*values.values())
    }
    assert {json.dumps(c.params, sort_keys=True) for c in cells} == expected
    assert len({c.name for c in cells}) == len(cells)
    assert all(c.name == cell_name(c.params) for c in cells)


def test_the_directory_holds_exactly_the_six_sweeps() -> None:
    assert sorted(p.stem for p in SWEEPS.glob("*.yaml")) == sorted(EXPECTED_RUNS)


@pytest.mark.parametrize("name", ["table1", "depth"])
def test_coursework_sweeps_use_the_shipped_table1_hyperparameters(name: str) -> None:
    # Every setting of configs/table1/vgg38-bn-rc.yaml, other than the run's name and the
    # swept model knobs, is set the same way by the sweep's fixed arguments.
    from gradtrace.cli import CONFIG_DIR

    shipped = flat(yaml.safe_load((CONFIG_DIR / "table1" / "vgg38-bn-rc.yaml").read_text()))
    config = sweep_config(name)
    fixed = {}
    for arg in fixed_args(config):
        key, _, value = arg.removeprefix("--").partition("=")
        fixed[key] = yaml.safe_load(value)
    swept = set(config["parameters"])
    for key, value in shipped.items():
        if key in ("run_name", "seed_everything") or key in swept:
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
    assert cell.name == "depth=38,batch_norm=true,residual=false,lr=0.01"
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
    assert cell.name == "arch=googlenet,batch_norm=true,stem=cifar,aux_logits=false,dataset=cifar10"
    command = agent_command(config, cell)
    model_arg = next(a for a in command if a.startswith("--model={"))
    assert yaml.safe_load(model_arg.split("=", 1)[1]) == cell.params["model"]


def test_cell_names() -> None:
    assert cell_name({"model.depth": 38, "model.batch_norm": False}) == "depth=38,batch_norm=false"
    assert cell_name({"a": None, "b.c": "x/y z"}) == "a=null,c=x_y_z"
    assert cell_name({"model": {"arch": "resnet20", "arch_kwargs": {"stem": "cifar"}}}) == (
        "arch=resnet20,stem=cifar"
    )


def test_cells_that_would_share_a_name_are_refused() -> None:
    config = {"method": "grid", "command": ["${args}"], "parameters": {"a.x": {"values": [1, "1"]}}}
    with pytest.raises(SweepConfigError, match="two runs get the same name 'x=1'"):
        expand(config)


def test_invalid_sweeps_are_refused_with_every_problem_listed(tmp_path: Path) -> None:
    bad = {
        "method": "grid",
        "metric": {"name": "val/acc", "goal": "biggest"},
        "command": ["${env}", "${interpreter}", "-m", "gradtrace", "fit"],
        "parameters": {"model.depth": {"values": [8, 38]}},
    }
    with pytest.raises(SweepConfigError) as err:
        validate(bad, source="bad.yaml")
    message = str(err.value)
    assert message.startswith("bad.yaml is not a valid W&B sweep:")
    assert "'biggest' is not one of ['minimize', 'maximize']" in message
    assert "command must be a list containing '${args}'" in message
    path = tmp_path / "s.yaml"
    path.write_text("method: [grid\n")
    with pytest.raises(SweepConfigError, match=r"s\.yaml is not valid YAML"):
        load_sweep(path)
    with pytest.raises(SweepConfigError, match="no sweep file"):
        load_sweep(tmp_path / "missing.yaml")
    random = {**bad, "method": "random", "metric": {"name": "val/acc", "goal": "maximize"}}
    with pytest.raises(SweepConfigError, match="only grid sweeps can be expanded"):
        expand(random)
    unknown = {**random, "method": "grid", "command": ["${args_json_file}", "${args}"]}
    with pytest.raises(SweepConfigError, match=r"command macro \$\{args_json_file\} is not"):
        agent_command(unknown, expand(unknown)[0])


def test_parse_gpus() -> None:
    assert parse_gpus("0,1,2,3") == ["0", "1", "2", "3"]
    assert parse_gpus(None) == []
    assert parse_gpus("") == []
    with pytest.raises(ValueError, match="comma-separated list such as 0,1,2,3; got '0,,1'"):
        parse_gpus("0,,1")


# ------------------------------------------------------------------------------------------
# Every cell runs


@pytest.mark.parametrize(
    ("name", "cell", "args"),
    [pytest.param(*c, id=f"{c[0]}:{c[1].name}") for c in grid_cells()],
)
def test_every_grid_cell_parses_and_trains_one_step(
    name: str, cell: Cell, args: list[str], tmp_path: Path
) -> None:
    cli_main([*args, *TINY, f"--trainer.default_root_dir={tmp_path}", "--run_name=cell"])
    (run,) = (tmp_path / "cell").iterdir()
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
    # depth's 48 differ in lr by pairs, architectures' 28 in the dataset by pairs.
    assert fixed_args(sweep_config("table1")) == fixed_args(sweep_config("depth"))
    ran = grid_cells()
    assert len(ran) == 16 // 2 + (48 - 16) // 2 + 28 // 2 + 36 + 6 + 8
    assert {n for n, _, _ in ran} == set(EXPECTED_RUNS)


@pytest.mark.slow
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
    config_yaml = yaml.safe_load((tmp_path / "agent/version_0/config.yaml").read_text())
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


@pytest.mark.slow
def test_sweep_local_reports_a_failed_cell_runs_the_other_and_skips_it_on_rerun(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(TWO_CELLS)
    root = tmp_path / "runs"
    argv = ["local", str(path), "--root", str(root), "--", *SMALL_RUN]

    assert sweep.main(argv) == 1
    out = capsys.readouterr().out
    good, bad = root / "depth=8", root / "depth=9"
    assert "[1/2] depth=8: done in" in out
    assert f"FAILED depth=9: exit code 2, log {bad / 'sweep-local.log'}" in out
    assert "1 done, 0 skipped (finished before), 1 failed" in out
    assert "depth must be 8 + 6*b" in (bad / "sweep-local.log").read_text()
    assert not (bad / "done.json").exists()
    done = json.loads((good / "done.json").read_text())
    assert done["exit_code"] == 0
    assert done["command"][-len(SMALL_RUN) :] == SMALL_RUN
    assert "--run_name=depth=8" in done["command"]
    assert "--ckpt_path=last" in done["command"]
    last_val = [
        float(r["val/acc"])
        for r in csv.DictReader((good / "version_0" / "metrics.csv").open())
        if r.get("val/acc")
    ][-1]
    assert done["metrics"]["val/acc"] == pytest.approx(last_val)
    assert done["metrics"]["step"] == 2.0
    assert not any("grad_flow" in k for k in done["metrics"])
    # W&B logged offline next to the CSV logs.
    assert list((good / "wandb").glob("offline-run-*"))

    assert sweep.main(argv) == 1
    out = capsys.readouterr().out
    assert f"[1/2] depth=8: skipped, finished before ({good / 'done.json'})" in out
    assert "0 done, 1 skipped (finished before), 1 failed" in out
    assert sorted(p.name for p in good.glob("version_*")) == ["version_0"]
    assert (bad / "sweep-local.log").read_text().count("$ /usr/bin/env") == 2


def test_sweep_local_dry_run_prints_the_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(TWO_CELLS)
    assert sweep.main(["local", str(path), "--dry-run", "--no-wandb", "--", "--x=1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{path}: 2 runs, one after the other, under runs/sweeps/two"
    assert lines[1] == (
        f"depth=8: /usr/bin/env {sys.executable} -m gradtrace fit --model.arch=coursework_vgg "
        "--model.depth=8 --trainer.default_root_dir=runs/sweeps/two --run_name=depth=8 "
        "--ckpt_path=last --x=1"
    )
    assert not Path("runs/sweeps/two").exists()


def test_sweep_local_refuses_overrides_it_sets_itself(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(TWO_CELLS)
    with pytest.raises(ValueError, match="give the output folder with --root"):
        sweep.run_local(path, overrides=["--trainer.default_root_dir=x"], dry_run=True)
    with pytest.raises(ValueError, match="--run_name is set per cell"):
        sweep.run_local(path, overrides=["--run_name=x"], dry_run=True)


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
        (f"c{i}", [sys.executable, "-c", script, str(tmp_path / f"c{i}.json")]) for i in range(4)
    ]
    results = run_cells(cells, tmp_path / "root", gpus=["a", "b"], echo=lambda _: None)
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


def test_final_metrics_follow_the_versions_in_order(tmp_path: Path) -> None:
    for version, (acc, loss) in enumerate([("0.5", "2.0"), ("0.7", "")]):
        folder = tmp_path / f"version_{version}"
        folder.mkdir()
        (folder / "metrics.csv").write_text(
            f"step,val/acc,val/loss,grad_flow/mean_abs/x\n{version},{acc},{loss},1\n"
        )
    (tmp_path / "version_10").mkdir()
    (tmp_path / "version_10" / "metrics.csv").write_text("step,val/acc\n10,0.9\n")
    assert final_metrics(tmp_path) == {"step": 10.0, "val/acc": 0.9, "val/loss": 2.0}


# ------------------------------------------------------------------------------------------
# sweep agents


FAKE_WANDB = """\
#!{python}
import json, os, sys
out = os.path.join({folder!r}, "agent-" + os.environ.get("CUDA_VISIBLE_DEVICES", "none"))
json.dump({{"argv": sys.argv[1:], "path0": os.environ["PATH"].split(os.pathsep)[0]}},
          open(out + ".json", "w"))
sys.exit(3 if os.environ.get("CUDA_VISIBLE_DEVICES") == {fail!r} else 0)
"""


def fake_wandb(folder: Path, fail: str | None = None) -> str:
    exe = folder / "wandb"
    exe.write_text(FAKE_WANDB.format(python=sys.executable, folder=str(folder), fail=fail))
    exe.chmod(0o755)
    return str(exe)


def test_agents_create_the_sweep_and_start_one_agent_per_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    created = []
    monkeypatch.setattr(
        wandb, "sweep", lambda config, project, entity: created.append(config) or "abc123"
    )
    monkeypatch.delenv("WANDB_MODE", raising=False)
    messages: list[str] = []
    code = launch_agents(
        SWEEPS / "table1.yaml",
        gpus=["0", "1"],
        project="p",
        count=2,
        wandb_executable=fake_wandb(tmp_path),
        echo=messages.append,
    )
    assert code == 0
    assert created == [yaml.safe_load((SWEEPS / "table1.yaml").read_text())]
    for gpu in "01":
        record = json.loads((tmp_path / f"agent-{gpu}.json").read_text())
        assert record["argv"] == ["agent", "--count", "2", "p/abc123"]
        assert record["path0"] == str(Path(sys.executable).parent)
    assert messages[-1] == "sweep p/abc123: 2 of 2 agents exited cleanly"


def test_agents_report_a_failed_agent_and_join_an_existing_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    monkeypatch.setattr(wandb, "sweep", lambda *a, **k: pytest.fail("must not create"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
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
    assert "agent (GPU 1) exited with code 3" in messages
    assert json.loads((tmp_path / "agent-0.json").read_text())["argv"] == [
        "agent",
        "team/gradtrace/xyz",
    ]


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
    assert sweep.main(["show", str(tmp_path / "nope.yaml")]) == 2
    assert "error: no sweep file" in capsys.readouterr().err
    assert sweep.main(["show", str(SWEEPS / "vgg_cifar10.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("vgg_cifar10.yaml: 6 runs")
    assert out[1].startswith("weight_decay=0.0,momentum=0.0: /usr/bin/env python -m gradtrace")
    with pytest.raises(SystemExit):
        sweep.main(["agents", str(SWEEPS / "table1.yaml"), "--", "--x=1"])
    assert "overrides after `--` apply to `local` only" in capsys.readouterr().err
