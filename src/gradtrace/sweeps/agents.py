"""W&B agents for a sweep: create (or join) the sweep on the W&B server and run one
``wandb agent`` per GPU, or per group of GPUs for DDP runs.

Each agent runs with ``CUDA_VISIBLE_DEVICES`` set to its GPU(s), this interpreter's folder
first on ``PATH`` (the agent runs ``python``, whatever is first there) and a ``MASTER_PORT``
of its own for its runs, which may be DDP runs (inherited ``MASTER_ADDR``/``MASTER_PORT`` are
replaced: agents sharing one port would collide; see :mod:`gradtrace.sweeps.launch`).
Its output, its runs' included, goes to ``<sweep folder>/agent-<n>.log`` (the folder of
:func:`~gradtrace.sweeps.grid.sweep_root`); the command prints one line per agent as it ends
(see :mod:`gradtrace.sweeps.outcome`) and a summary. An agent that exits non-zero or reports
``wandb: ERROR`` (``wandb agent`` exits 0 for an unknown sweep, for instance) counts as
failed. Ctrl-C stops the agents and their runs (see :mod:`gradtrace.sweeps.launch`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradtrace.sweeps.grid import load_sweep, sweep_root, with_ddp
from gradtrace.sweeps.launch import Interrupted, ProcessGroups, cell_environment, free_port
from gradtrace.sweeps.outcome import (
    DONE,
    FAILED,
    LaunchResult,
    last_error_line,
    log_mentions,
    summary_line,
)

__all__ = ["gpu_groups", "launch_agents", "sweep_path", "visible_gpus"]

ERROR_MARK = "wandb: ERROR"
POLL_SECONDS = 0.5


def sweep_path(sweep_id: str, project: str, entity: str | None = None) -> str:
    """``ID``, ``project/ID`` or ``entity/project/ID`` (as W&B's UI shows it) as the
    ``entity/project/ID`` (or ``project/ID`` without an entity) that ``wandb agent`` takes;
    parts given in ``sweep_id`` win over ``project`` and ``entity``."""
    parts = sweep_id.strip().split("/")
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise ValueError(
            f"--sweep-id must be ID, project/ID or entity/project/ID; got {sweep_id!r}"
        )
    if len(parts) == 1:
        parts = [project, *parts]
    if len(parts) == 2 and entity:
        parts = [entity, *parts]
    return "/".join(parts)


def gpu_groups(gpus: Sequence[str], per_run: int) -> list[str]:
    """Consecutive groups of ``per_run`` GPUs as ``CUDA_VISIBLE_DEVICES`` values:
    ``(["0", "1", "2", "3"], 2)`` -> ``["0,1", "2,3"]``.

    A GPU listed twice within one group is refused (one DDP process per GPU); across groups
    it may repeat, as in :func:`~gradtrace.sweeps.launch.parse_gpus`: two runs share it.
    """
    if per_run < 1 or len(gpus) % per_run:
        raise ValueError(
            f"{len(gpus)} GPUs ({','.join(gpus)}) do not split into groups of {per_run}"
        )
    groups = [list(gpus[i : i + per_run]) for i in range(0, len(gpus), per_run)]
    for group in groups:
        # CUDA_VISIBLE_DEVICES reads 0 and 00 as one GPU.
        ids = [str(int(g)) if g.isdigit() else g for g in group]
        repeated = sorted({g for g in ids if ids.count(g) > 1})
        if repeated:
            raise ValueError(
                f"GPUs {','.join(gpus)} with DDP over {per_run}: the group {','.join(group)} "
                f"lists GPU {','.join(repeated)} more than once; each DDP run needs "
                f"{per_run} different GPUs (a GPU may repeat in different groups: two runs "
                "then share it)"
            )
    return [",".join(group) for group in groups]


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _wandb_executable() -> str:
    beside = Path(sys.executable).with_name("wandb")
    found = str(beside) if beside.is_file() else shutil.which("wandb")
    if found is None:
        raise RuntimeError("the `wandb` command was not found; pip install wandb")
    return found


def _create_sweep(config: Mapping[str, Any], project: str, entity: str | None) -> str:
    import wandb

    try:
        return wandb.sweep(dict(config), project=project, entity=entity)
    except Exception as err:  # login prompt refused, no network, server error
        raise RuntimeError(
            f"could not create the sweep on W&B ({type(err).__name__}: {err}). It needs "
            "`wandb login` (or WANDB_API_KEY) and network; without them use "
            "`make sweep-local`"
        ) from err


@dataclass
class _Agent:
    """One started ``wandb agent``: its name, its process, its log and where this launch's
    output starts in it."""

    name: str
    process: subprocess.Popen
    log_file: Path
    start: int
    started_at: float

    def result(self) -> LaunchResult:
        code = self.process.returncode
        reported = log_mentions(self.log_file, ERROR_MARK, self.start)
        status = DONE if code == 0 and not reported else FAILED
        return LaunchResult(
            self.name,
            status,
            self.log_file,
            code,
            time.perf_counter() - self.started_at,
            error_line=None if status == DONE else last_error_line(self.log_file, self.start),
        )


def launch_agents(
    path: str | Path,
    *,
    gpus: Sequence[str] = (),
    ddp: int = 1,
    project: str = "gradtrace",
    entity: str | None = None,
    sweep_id: str | None = None,
    count: int | None = None,
    wandb_executable: str | None = None,
    echo: Callable[[str], None] = print,
) -> int:
    """Create the sweep in ``path`` on W&B (or join ``sweep_id``) and run one agent per GPU
    (``ddp`` > 1: per group of ``ddp`` GPUs, each run one DDP run over them). Waits for all
    agents, printing one line per agent as it ends and a summary; returns 0 when all
    succeeded, else 1.

    Refuses, before touching W&B, to start an unpinned agent where several GPUs are visible.
    """
    config = load_sweep(path)
    if ddp > 1:
        config = with_ddp(config, ddp)
    groups = gpu_groups(list(gpus), ddp) if gpus else []
    if not gpus and (count_visible := visible_gpus()) > 1:
        raise RuntimeError(
            f"{count_visible} GPUs are visible and none was chosen: pin the agents with "
            "GPUS (one agent per GPU), e.g. `make sweep SWEEP=... GPUS=0,1,2,3`, or "
            "`GPUS=0` for one agent on one GPU"
        )
    if ddp > 1 and not gpus:
        raise RuntimeError(f"DDP over {ddp} GPUs needs them listed, e.g. GPUS=0,1,2,3")
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        raise RuntimeError(
            f"WANDB_MODE={os.environ['WANDB_MODE']}: W&B agents need the W&B server; "
            "run the grid without one with `make sweep-local`"
        )
    executable = wandb_executable or _wandb_executable()
    if sweep_id is None:
        target = sweep_path(_create_sweep(config, project, entity), project, entity)
    else:
        target = sweep_path(sweep_id, project, entity)
    command = [executable, "agent", *(["--count", str(count)] if count else []), target]
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    folder = sweep_root(config, path)
    folder.mkdir(parents=True, exist_ok=True)
    logs = f"{folder}/agent-<n>.log"
    slots = groups or [None]
    where = f" on GPUs {' '.join(groups)}" if groups else ""
    echo(f"sweep {target}: {len(slots)} agent(s){where}: {shlex.join(command)} (output: {logs})")
    processes = ProcessGroups()
    agents: list[_Agent] = []
    ports: list[int] = []
    results: dict[int, LaunchResult] = {}
    try:
        for n, gpu in enumerate(slots, 1):
            ports.append(free_port(ports))
            log_file = folder / f"agent-{n}.log"
            with log_file.open("a") as log:
                log.write(f"\n$ {shlex.join(command)}\n")
                log.flush()
                process = processes.start(
                    command,
                    env=cell_environment(env, ports[-1], gpu),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                name = f"agent {n}" + ("" if gpu is None else f" on GPU {gpu}")
                agents.append(_Agent(name, process, log_file, log.tell(), time.perf_counter()))
        while True:
            for i, agent in enumerate(agents):
                if i not in results and agent.process.poll() is not None:
                    results[i] = agent.result()
                    echo(results[i].line(i, len(agents)))
            if len(results) == len(agents):
                break
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt as err:
        echo("stopping the agents and their runs (each run keeps its last checkpoint)")
        processes.stop()
        raise Interrupted("interrupted") from err
    ended = [results[i] for i in range(len(agents))]
    echo(summary_line(f"sweep {target}", ended, logs))
    return 1 if any(r.status == FAILED for r in ended) else 0
