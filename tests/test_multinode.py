"""Runs past one machine (docs/cluster.md).

Two "nodes" of this machine train as one process with the same global batch: ``gradtrace fit
--trainer.num_nodes 2 --trainer.devices 1`` started by two torchrun launchers (node ranks 0 and
1), and by two processes in the environment srun gives the tasks of a 2-node SLURM job, end
with the weights, the logged metrics and the gradient flow of one process given the same
``--data.batch_size``, to float rounding. The SLURM templates in ``scripts/slurm/`` are valid
bash and, run with stand-ins for srun, scontrol, wandb and the sweep launcher, hand the CLI
command lines it accepts, resume only from a checkpoint that exists, requeue their job when
the time limit nears, and give each agent or shard its GPUs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from gradtrace.cli.trainer_cli import run_directory
from gradtrace.measure import read_history
from gradtrace.sweeps.launch import free_port
from helpers.cli_runs import QUIET, metrics_rows
from helpers.multinode import (
    Launch,
    gradtrace_command,
    local_environment,
    run_together,
    slurm_job_id_with_a_free_port,
    srun_task_environment,
    torchrun_launchers,
)

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "scripts" / "slurm"

NODES = 2
GLOBAL_BATCH = 20
STEPS = 4  # 2 epochs of 2 steps
# One training, the same global batch on 1 or 2 processes. The reasons for the model (no
# BatchNorm, no dropout, SGD) are those of helpers.cli_runs.DDP_EQUALITY_OVERRIDES. The large
# learning rate moves the weights by 2e-4 to 1e-2 of their size in these steps (1e-3 would move
# them by 1e-6, under the tolerance): an update that is off at all shows in the final weights.
# A few steps only: once rounding separates the weights, a ReLU or max-pool input near a tie
# can go the other way (tests/test_cli.py's 9-step run sees 1e-3 in the first layers'
# gradients at its last step); over these 4 steps every logged value agrees to 3e-6.
TRAINING = [
    "fit",
    "--run_name=r",
    "--model.arch=vgg11",
    "--model.arch_kwargs={head: cifar, dropout: 0.0}",
    "--model.optimizer=sgd",
    "--model.lr=0.5",
    "--data.dataset=synthetic",
    "--data.synthetic_sizes=[60, 20]",  # 40 training images once 20 are held out
    "--data.val_size=20",
    f"--data.batch_size={GLOBAL_BATCH}",
    "--trainer.max_epochs=2",
    "--trainer.accelerator=cpu",
    "--trainer.callbacks+=gradtrace.GradientFlow",
    "--trainer.callbacks.every_n_steps=1",
    "--trainer.callbacks.plot=false",
    *QUIET,
]
ON_TWO_NODES = [f"--trainer.num_nodes={NODES}", "--trainer.devices=1"]
RTOL = 1e-5
ATOL = 1e-9  # for logged values that are zero or nearly (a count of non-finite values)
SPLIT_NOTE = f"DDP over {NODES} processes: global batch {GLOBAL_BATCH}, {GLOBAL_BATCH // NODES}"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of the training on one process: the reference."""
    base = tmp_path_factory.mktemp("one-process")
    root = base / "runs"
    command = gradtrace_command(
        *TRAINING, "--trainer.devices=1", f"--trainer.default_root_dir={root}"
    )
    run_together(lambda: [Launch(command, local_environment())], root, base / "logs")
    return root / "r"


def listing(run_dir: Path) -> list[str]:
    return sorted(str(path.relative_to(run_dir)) for path in run_dir.rglob("*"))


def assert_same_values(rows: list[dict[str, Any]], reference: list[dict[str, Any]]) -> None:
    """Equal rows: the same keys, numbers equal to :data:`RTOL`, anything else exactly."""
    assert [sorted(row) for row in rows] == [sorted(row) for row in reference]
    for row, expected in zip(rows, reference):
        for key, value in expected.items():
            if isinstance(value, float):
                assert row[key] == pytest.approx(value, rel=RTOL, abs=ATOL), (key, row)
            else:
                assert row[key] == value, (key, row)


def logged(run_dir: Path) -> list[dict[str, Any]]:
    """``metrics.csv`` with the empty cells left out and the values as numbers."""
    return [{k: float(v) for k, v in row.items() if v} for row in metrics_rows(run_dir)]


def assert_trains_as_one_process(run_dir: Path, reference: Path) -> None:
    """The same files, final weights, logged metrics (losses, accuracies, per-layer gradient
    statistics) and ``gradient_flow.csv`` as the one-process run."""
    assert listing(run_dir) == listing(reference)  # rank 0 alone wrote, in the same places
    mine, theirs = (
        torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        for d in (run_dir, reference)
    )
    assert mine["global_step"] == theirs["global_step"] == STEPS
    assert mine["state_dict"].keys() == theirs["state_dict"].keys()
    for name, expected in theirs["state_dict"].items():
        # Relative to the tensor's scale: the gradient of an entry that ends near zero is a
        # sum of terms as large as its neighbours', and carries their rounding.
        scale = expected.abs().max().item()
        torch.testing.assert_close(mine["state_dict"][name], expected, rtol=RTOL, atol=RTOL * scale)
    ran = logged(run_dir)
    assert any("train/loss" in row for row in ran)
    assert_same_values(ran, logged(reference))
    flow = read_history(run_dir / "gradient_flow.csv")
    assert len(flow) == STEPS * 11  # every step, every weight of vgg11's 8 convs and 3 linears
    assert_same_values(flow, read_history(reference / "gradient_flow.csv"))


@pytest.mark.slow
@pytest.mark.integration
def test_torchrun_on_two_nodes_trains_as_one_process(one_process: Path, tmp_path: Path) -> None:
    root = tmp_path / "torchrun"
    args = [*TRAINING, *ON_TWO_NODES, f"--trainer.default_root_dir={root}"]
    outputs = run_together(
        lambda: torchrun_launchers(args, nodes=NODES, port=free_port()), root, tmp_path / "logs"
    )
    assert SPLIT_NOTE in outputs[0]  # node 0 runs global rank 0
    assert_trains_as_one_process(root / "r", one_process)


@pytest.mark.slow
@pytest.mark.integration
def test_srun_tasks_of_a_two_node_job_train_as_one_process(
    one_process: Path, tmp_path: Path
) -> None:
    root = tmp_path / "srun"
    command = gradtrace_command(*TRAINING, *ON_TWO_NODES, f"--trainer.default_root_dir={root}")

    def tasks() -> list[Launch]:
        job_id = slurm_job_id_with_a_free_port()
        return [
            Launch(command, srun_task_environment(task, nodes=NODES, job_id=job_id))
            for task in range(NODES)
        ]

    outputs = run_together(tasks, root, tmp_path / "logs")
    assert SPLIT_NOTE in outputs[0]  # SLURM_PROCID 0 is global rank 0
    assert_trains_as_one_process(root / "r", one_process)


# --- the sbatch templates ---------------------------------------------------------------

# Stands in for srun, scontrol and wandb, and for `python -m gradtrace.sweeps` (any other
# `python` is the real one): records its name, arguments and CUDA_VISIBLE_DEVICES, then sleeps
# STUB_<NAME>_SECONDS (STUB_SRUN_SECONDS: a training that takes its time).
STUB = """\
#!{python}
import json, os, sys, time
from pathlib import Path

name, args = Path(sys.argv[0]).name, sys.argv[1:]
if name == "python" and args[:2] != ["-m", "gradtrace.sweeps"]:
    os.execv(sys.executable, [sys.executable, *args])
record = {{"name": name, "args": args, "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}}
path = Path(os.environ["STUB_RECORDS"]) / f"{{time.time_ns()}}-{{os.getpid()}}.json"
path.write_text(json.dumps(record))
time.sleep(float(os.environ.get(f"STUB_{{name.upper()}}_SECONDS", "0")))
"""
STUBBED = ("srun", "scontrol", "wandb", "python")
JOB_ID = "4242"
# A 2-node job of 4 tasks per node, as sbatch describes it to its script.
FIT_JOB = {
    "SLURM_JOB_ID": JOB_ID,
    "SLURM_JOB_NAME": "gradtrace-fit",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS_PER_NODE": "4",
}


class BatchJob:
    """Runs a template as sbatch would on the first node of its job: in ``workdir`` (the
    submit directory), with SLURM's variables, and a ``VENV`` whose activation puts the
    stand-ins first on PATH."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.records = workdir / "records"
        self.records.mkdir()
        stubs = workdir / "stubs"
        stubs.mkdir()
        for name in STUBBED:
            (stubs / name).write_text(STUB.format(python=sys.executable))
            (stubs / name).chmod(0o755)
        venv = workdir / "venv"
        (venv / "bin").mkdir(parents=True)
        real_bin = Path(sys.executable).parent
        (venv / "bin" / "activate").write_text(f'export PATH="{stubs}:{real_bin}:$PATH"\n')
        self.env = {**local_environment(), "VENV": str(venv), "STUB_RECORDS": str(self.records)}

    def command(self, template: str, *args: str) -> list[str]:
        return ["bash", str(TEMPLATES / template), *args]

    def run(self, template: str, *args: str, **slurm: str) -> None:
        """Run ``template`` with ``args`` and SLURM's variables ``slurm`` to its end."""
        done = subprocess.run(
            self.command(template, *args),
            env={**self.env, **slurm},
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr[-3000:]

    def calls(self, name: str) -> list[dict[str, Any]]:
        """The stand-in ``name``'s calls so far, oldest first; each record is then removed."""
        paths = sorted(self.records.glob("*.json"), key=lambda p: int(p.name.split("-")[0]))
        records = [(path, json.loads(path.read_text())) for path in paths]
        mine = [(path, record) for path, record in records if record["name"] == name]
        for path, _ in mine:
            path.unlink()
        return [record for _, record in mine]


@pytest.fixture
def job(tmp_path: Path) -> BatchJob:
    return BatchJob(tmp_path)


@pytest.mark.parametrize("template", sorted(p.name for p in TEMPLATES.glob("*.sbatch")))
def test_template_is_valid_bash(template: str) -> None:
    done = subprocess.run(["bash", "-n", str(TEMPLATES / template)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def srun_fit_args(call: dict[str, Any]) -> list[str]:
    """The arguments srun passes to ``gradtrace``."""
    args = call["args"]
    return args[args.index("gradtrace") + 1 :]


@pytest.mark.integration
def test_fit_template_runs_gradtrace_in_the_jobs_shape_and_resumes_only_a_checkpoint(
    job: BatchJob,
) -> None:
    job.run("fit-multinode.sbatch", **FIT_JOB)
    [call] = job.calls("srun")
    args = srun_fit_args(call)
    assert args[0] == "fit"
    assert args[args.index("--trainer.num_nodes") + 1] == "2"  # SLURM_NNODES
    assert args[args.index("--trainer.devices") + 1] == "4"  # SLURM_NTASKS_PER_NODE
    assert "--ckpt_path" not in args  # nothing to resume yet: it would be an error
    run_dir = job.workdir / run_directory(args)  # parses as the CLI does; relative to the job
    assert run_dir.parent == job.workdir / "runs"

    # A requeued job starts the script again: now it resumes from the run's last epoch end.
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").touch()
    job.run("fit-multinode.sbatch", **FIT_JOB)
    [call] = job.calls("srun")
    assert srun_fit_args(call) == [*args, "--ckpt_path", "last"]


@pytest.mark.integration
def test_fit_template_requeues_its_job_on_the_time_limit_signal(job: BatchJob) -> None:
    script = subprocess.Popen(
        job.command("fit-multinode.sbatch"),
        env={**job.env, **FIT_JOB, "STUB_SRUN_SECONDS": "120"},
        cwd=job.workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the script and what it started
    )
    try:
        deadline = time.monotonic() + 120
        while not list(job.records.glob("*.json")) and time.monotonic() < deadline:
            assert script.poll() is None, "the script ended before it started srun"
            time.sleep(0.2)
        assert job.calls("srun"), "srun was not started"
        os.kill(script.pid, signal.SIGUSR1)  # what --signal=B:USR1@90 sends to the batch shell
        assert script.wait(timeout=60) == 128 + signal.SIGUSR1  # ended by it, after the trap
    finally:
        # What SLURM does to a requeued job: stop everything it runs (here the srun stand-in).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(script.pid, signal.SIGKILL)
        script.wait()
    assert [call["args"] for call in job.calls("scontrol")] == [["requeue", JOB_ID]]


@pytest.mark.integration
def test_agents_template_runs_one_agent_on_each_gpu_of_its_task(job: BatchJob) -> None:
    sweep = "entity/project/abc123"
    # SLURM's GPU ids as given to an array task (physical ones when devices are not confined)
    job.run("wandb-agents.sbatch", sweep, CUDA_VISIBLE_DEVICES="2,3,5,7", SLURM_JOB_ID=JOB_ID)
    calls = job.calls("wandb")
    assert sorted(call["gpus"] for call in calls) == ["2", "3", "5", "7"]
    assert all(call["args"] == ["agent", sweep] for call in calls)


@pytest.mark.integration
def test_sweep_local_template_runs_the_shard_of_its_array_task(job: BatchJob) -> None:
    sweep = REPO / "sweeps" / "table1.yaml"
    # The second task of `--array=4-6`: shard 1 of 3.
    task = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"}
    job.run("sweep-local.sbatch", str(sweep), "--no-wandb", CUDA_VISIBLE_DEVICES="0,1", **task)
    [call] = job.calls("python")
    args = call["args"]
    assert args == [
        "-m", "gradtrace.sweeps", "local", str(sweep),
        "--shard", "1/3", "--gpus", "0,1", "--no-wandb",
    ]  # fmt: skip
    # The launcher accepts them: shard 1 of 3 of table1's 16 cells is cells 1, 4, ..., 13.
    shown = subprocess.run(
        [sys.executable, *args, "--dry-run"],
        cwd=job.workdir,
        env=local_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert sum(" -m gradtrace fit " in line for line in shown.stdout.splitlines()) == 5
