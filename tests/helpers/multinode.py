"""Two "nodes" on this machine: the processes of one multi-node ``gradtrace fit``, started as
two torchrun launchers (one per node rank) or as the tasks srun starts for a 2-node SLURM job,
run together, torn down together, and run once more when a rank died of a signal."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gradtrace.sweeps.launch import LOCAL_ADDRESS, OUTER_JOB_VARIABLES, ProcessGroups, free_port

__all__ = [
    "Launch",
    "gradtrace_command",
    "local_environment",
    "run_together",
    "slurm_job_id_with_a_free_port",
    "srun_task_environment",
    "torchrun_launchers",
]

# Ports Lightning's SLURMEnvironment derives from a job id: 15000 + its last four digits.
SLURM_PORTS = range(15000, 25000)
# "exitcode  : -6 (pid: ...)": how torchrun reports a worker that a signal ended.
TORCHRUN_WORKER_SIGNALLED = re.compile(r"exitcode\s*:\s*-\d+")


@dataclass(frozen=True)
class Launch:
    """One process to start: a torchrun launcher (one "node") or one rank."""

    argv: list[str]
    env: dict[str, str]


def gradtrace_command(*args: str) -> list[str]:
    """``gradtrace <args>`` with this interpreter."""
    return [sys.executable, "-m", "gradtrace", *args]


def local_environment() -> dict[str, str]:
    """This process's environment without any outer job's ranks or rendezvous (the tests may
    themselves run inside a SLURM or torchrun job), one thread per process (two or three
    processes share two cores, and every run must sum in the same order)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in OUTER_JOB_VARIABLES
        and not key.startswith(("SLURM_", "TORCHELASTIC_"))
        and key not in ("MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun_launchers(args: Sequence[str], *, nodes: int, port: int) -> list[Launch]:
    """One ``torchrun --nnodes <nodes> --nproc-per-node 1 --node-rank R`` launcher per node,
    all on this machine, each running ``python -m gradtrace <args>``."""
    env = local_environment()
    return [
        Launch(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",  # the `torchrun` script's module
                f"--nnodes={nodes}",
                "--nproc-per-node=1",
                f"--node-rank={node}",
                f"--master-addr={LOCAL_ADDRESS}",
                f"--master-port={port}",
                "-m",
                "gradtrace",
                *args,
            ],
            env,
        )
        for node in range(nodes)
    ]


def slurm_job_id_with_a_free_port() -> str:
    """A SLURM job id whose port under Lightning's rule (15000 + the id's last four digits)
    is free now."""
    port = free_port(taken=set(range(SLURM_PORTS.stop, 65536)))
    return f"77{port - SLURM_PORTS.start:04d}"


def srun_task_environment(task: int, *, nodes: int, job_id: str) -> dict[str, str]:
    """The environment srun gives task ``task`` of a batch job of ``nodes`` nodes with one
    task per node (``sbatch --nodes N --ntasks-per-node 1``): what Lightning's
    SLURMEnvironment reads and validates, and its neighbours. The "nodes" are loopback
    addresses of this machine; Lightning's rendezvous is the first of them, on the port it
    derives from the job id (no MASTER_ADDR or MASTER_PORT is set)."""
    nodelist = ",".join(f"127.0.0.{n + 1}" for n in range(nodes))
    return {
        **local_environment(),
        "SLURM_JOB_ID": job_id,
        "SLURM_JOBID": job_id,
        # Not "bash" or "interactive": under those names Lightning ignores SLURM.
        "SLURM_JOB_NAME": "gradtrace-multinode",
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NODELIST": nodelist,
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_NTASKS": str(nodes),
        "SLURM_NPROCS": str(nodes),
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_TASKS_PER_NODE": f"1(x{nodes})",
        "SLURM_PROCID": str(task),
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": str(task),
    }


def run_together(
    launches: Callable[[], list[Launch]], output: Path, logs: Path, timeout: float = 180
) -> list[str]:
    """Start ``launches()`` at once, wait for all, and return their outputs (stdout and
    stderr), asserting each exited 0.

    When one fails, the others (waiting for it in a collective) are stopped. If the first to
    fail was killed by a signal (on a busy machine a gloo rank has died of SIGABRT in the C++
    runtime), ``output`` is removed and everything runs once more with fresh ``launches()``
    (new ports); a Python error, or a signal that comes back, fails.
    """
    failure, outputs = _run_once(launches(), logs / "attempt1", timeout)
    if failure is not None and _died_of_a_signal(*failure, outputs):
        shutil.rmtree(output, ignore_errors=True)
        failure, outputs = _run_once(launches(), logs / "attempt2", timeout)
    if failure is not None:
        code, index = failure
        raise AssertionError(
            f"process {index} exited {code}; its output:\n{outputs[index][-3000:]}"
        )
    return outputs


def _died_of_a_signal(code: int, index: int, outputs: list[str]) -> bool:
    return code < 0 or bool(TORCHRUN_WORKER_SIGNALLED.search(outputs[index]))


def _run_once(
    launches: list[Launch], logs: Path, timeout: float
) -> tuple[tuple[int, int] | None, list[str]]:
    """The first failure (see :func:`_wait_for_all_or_a_failure`) and every output."""
    logs.mkdir(parents=True)
    paths = [logs / f"process{i}.log" for i in range(len(launches))]
    groups = ProcessGroups()
    files = [path.open("w") for path in paths]
    try:
        processes = [
            groups.start(launch.argv, env=launch.env, stdout=log, stderr=log)
            for launch, log in zip(launches, files)
        ]
        failure = _wait_for_all_or_a_failure(processes, timeout)
    finally:
        groups.stop(grace=10)
        for log in files:
            log.close()
    return failure, [path.read_text() for path in paths]


def _wait_for_all_or_a_failure(
    processes: Sequence[subprocess.Popen], timeout: float
) -> tuple[int, int] | None:
    """``None`` once every process exited 0, else ``(exit code, index)`` of the first that
    did not (a timeout counts as the first still running, exit code 124)."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [process.poll() for process in processes]
        for index, code in enumerate(codes):
            if code not in (None, 0):
                return code, index
        if all(code == 0 for code in codes):
            return None
        if time.monotonic() > deadline:
            return 124, codes.index(None)
        time.sleep(0.2)
