"""Launching runs as subprocesses: a pool of GPUs (one run per GPU at a time), one log and one
``done.json`` per run directory, one line per run as it ends (see
:mod:`gradtrace.sweeps.outcome`), and stopping everything on Ctrl-C.

Every child starts in its own process group; on Ctrl-C (or SIGTERM) the launcher sends SIGINT
to each child's group and to the groups of the child's descendants (``wandb agent`` starts
each training run in a group of its own), so Lightning stops cleanly and each run keeps its
``last.ckpt``; whatever still runs after a grace period is killed.

Each child is a run of its own on this machine (:func:`cell_environment`): it gets
``MASTER_ADDR=127.0.0.1`` and a ``MASTER_PORT`` of its own (:func:`free_port`), replacing
inherited ones: Lightning's DDP rendezvouses on an inherited ``MASTER_PORT`` as is, so DDP runs
at the same time on one machine would otherwise collide on one port (one fails with
EADDRINUSE, or joins the other's process group). The rank variables of a launcher around this
one (``srun``, ``torchrun``, ``jsrun``) are left out: with them, Lightning would take each cell
for one process of that outer job (``LOCAL_RANK`` alone stops it from starting the cell's
other DDP processes).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gradtrace.sweeps.outcome import DONE, FAILED, SKIPPED, LaunchResult, last_error_line

__all__ = [
    "DONE_FILE",
    "LOG_FILE",
    "RESUME_ARGUMENT",
    "Interrupted",
    "ProcessGroups",
    "cell_environment",
    "final_metrics",
    "free_port",
    "parse_gpus",
    "run_cells",
    "split_run_arguments",
]

DONE_FILE = "done.json"
LOG_FILE = "launch.log"
# What the launchers append to a command whose run has a checkpoint to continue from.
RESUME_ARGUMENT = "--ckpt_path=last"
GRACE_SECONDS = 30.0
LOCAL_ADDRESS = "127.0.0.1"
# Below the ranges the system hands out to outgoing connections (Linux 32768-60999, macOS and
# Windows 49152-65535): a port found free here stays free until the run binds it, even hours
# later (an agent's next run).
PORT_RANGE = range(20000, 32768)


class Interrupted(Exception):
    """The launcher was stopped (Ctrl-C or SIGTERM) and stopped its children."""


def split_run_arguments(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """A launcher's own arguments, and those after ``--`` that it passes on to every run."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    split = argv.index("--")
    return argv[:split], argv[split + 1 :]


def parse_gpus(value: str | None) -> list[str]:
    """``"0,1,2,3"`` -> ``["0", "1", "2", "3"]``; ``None`` or ``""`` -> ``[]``.

    Any token ``CUDA_VISIBLE_DEVICES`` takes (index or ``GPU-<uuid>``); repeating one runs two
    runs (or agents) on that GPU at once.
    """
    if not value:
        return []
    gpus = [token.strip() for token in value.split(",")]
    if any(not token or re.search(r"\s", token) for token in gpus):
        raise ValueError(f"gpus must be a comma-separated list such as 0,1,2,3; got {value!r}")
    return gpus


def free_port(taken: Collection[int] = ()) -> int:
    """A TCP port in :data:`PORT_RANGE` that nothing is bound to now and that is not in
    ``taken`` (the ports handed to children still running), chosen at random so that two
    launchers at once rarely try the same one."""
    candidates = [port for port in PORT_RANGE if port not in taken]
    random.SystemRandom().shuffle(candidates)
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free TCP port in {PORT_RANGE.start}-{PORT_RANGE.stop - 1}")


# What Lightning's cluster environments read to find an outer job's ranks (SLURM: the task
# count; torchrun; LSF's jsrun; its own LightningEnvironment).
OUTER_JOB_VARIABLES = frozenset(
    {
        "SLURM_NTASKS",
        "SLURM_NTASKS_PER_NODE",
        "SLURM_PROCID",
        "SLURM_LOCALID",
        "SLURM_NODEID",
        "TORCHELASTIC_RUN_ID",
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "GROUP_WORLD_SIZE",
        "ROLE_RANK",
        "ROLE_WORLD_SIZE",
        "NODE_RANK",
        "JSM_NAMESPACE_LOCAL_RANK",
        "JSM_NAMESPACE_RANK",
        "JSM_NAMESPACE_SIZE",
    }
)


def cell_environment(base: Mapping[str, str], port: int, gpu: str | None) -> dict[str, str]:
    """``base`` for a child whose DDP processes all run here, on ``gpu`` (a
    ``CUDA_VISIBLE_DEVICES`` value; ``None``: as inherited): an outer job's rank variables
    left out, ``MASTER_ADDR``/``MASTER_PORT`` its own."""
    env = {key: value for key, value in base.items() if key not in OUTER_JOB_VARIABLES}
    env.update(MASTER_ADDR=LOCAL_ADDRESS, MASTER_PORT=str(port))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (Linux ``/proc``; elsewhere none are found)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class ProcessGroups:
    """Children started in process groups of their own, stopped together by :meth:`stop`."""

    def __init__(self) -> None:
        self._processes: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self.stopping = threading.Event()

    def start(self, command: Sequence[str], **kwargs: object) -> subprocess.Popen:
        """``subprocess.Popen(command, **kwargs)`` in a new session (its own group)."""
        with self._lock:
            if self.stopping.is_set():
                raise Interrupted("stopping: no new process is started")
            process = subprocess.Popen(list(command), start_new_session=True, **kwargs)
            self._processes.append(process)
        return process

    def _signal_all(self, signum: int) -> None:
        for process in self._processes:
            if process.poll() is not None:
                continue
            groups = {process.pid}
            for pid in _descendants(process.pid):
                with contextlib.suppress(ProcessLookupError):
                    groups.add(os.getpgid(pid))
            for group in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signum)

    def stop(self, grace: float = GRACE_SECONDS) -> None:
        """SIGINT to every child's group and its descendants' groups; SIGKILL after
        ``grace`` seconds to whatever still runs."""
        with self._lock:
            self.stopping.set()
        self._signal_all(signal.SIGINT)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self._processes):
            time.sleep(0.1)
        self._signal_all(signal.SIGKILL)
        for process in self._processes:
            process.wait()


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The last finite value of every metric but the per-layer ``grad_flow/*`` in
    ``<run_dir>/metrics.csv``; ``{}`` when nothing was logged."""
    from gradtrace.cli.run_files import read_run

    if not (run_dir / "metrics.csv").is_file():
        return {}
    run = read_run(run_dir)
    keys = {k for row in run.metrics for k in row if not k.startswith("grad_flow/")}
    values = {key: run.last(key) for key in sorted(keys - {"step", "epoch"})}
    return {key: value for key, value in values.items() if value is not None}


def run_cells(
    runs: Sequence[tuple[Path, list[str]]],
    *,
    gpus: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    echo: Callable[[str], None] = print,
    groups: ProcessGroups | None = None,
) -> list[LaunchResult]:
    """Run ``(run directory, command)`` pairs as subprocesses; one
    :meth:`~gradtrace.sweeps.outcome.LaunchResult.line` goes to ``echo`` as each ends.

    A run whose directory holds ``done.json`` is skipped. Otherwise its output is appended to
    ``<run dir>/launch.log``; exit code 0 writes ``done.json`` (command, seconds, final
    metrics); a command holding :data:`RESUME_ARGUMENT` is reported as resumed. With
    ``gpus``, as many runs go at once as there are entries, each with
    ``CUDA_VISIBLE_DEVICES`` set to its GPU; without, one at a time. Each child has a
    ``MASTER_PORT`` no other running child has (see the module docstring). A failure is
    reported with its log's last error line, and the others go on. Ctrl-C stops every child
    (see the module docstring) and raises :class:`Interrupted`.
    """
    groups = groups or ProcessGroups()
    lock = threading.Lock()
    ports: set[int] = set()  # the MASTER_PORTs of the children running now
    free: queue.Queue[str | None] = queue.Queue()
    for gpu in gpus or [None]:
        free.put(gpu)
    total = len(runs)

    def say(message: str) -> None:
        with lock:
            echo(message)

    def launch(run_dir: Path, command: list[str]) -> LaunchResult:
        done = run_dir / DONE_FILE
        log_file = run_dir / LOG_FILE
        if done.is_file():
            recorded = json.loads(done.read_text())
            return LaunchResult(run_dir.name, SKIPPED, log_file, 0, metrics=recorded["metrics"])
        run_dir.mkdir(parents=True, exist_ok=True)
        resumed = RESUME_ARGUMENT in command
        gpu = free.get()
        with lock:
            port = free_port(ports)
            ports.add(port)
        try:
            child_env = cell_environment(os.environ if env is None else env, port, gpu)
            start = time.perf_counter()
            with log_file.open("a") as log:
                log.write(f"\n$ {shlex.join(command)}\n")
                log.flush()
                this_launch = log.tell()  # where this launch's output starts
                process = groups.start(command, stdout=log, stderr=subprocess.STDOUT, env=child_env)
                code = process.wait()
            seconds = time.perf_counter() - start
        finally:
            with lock:
                ports.discard(port)
            free.put(gpu)
        if code != 0:
            error = last_error_line(log_file, this_launch)
            return LaunchResult(run_dir.name, FAILED, log_file, code, seconds, {}, resumed, error)
        metrics = final_metrics(run_dir)
        record = {
            "run_dir": str(run_dir),
            "command": command,
            "exit_code": 0,
            "seconds": round(seconds, 1),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "metrics": metrics,
        }
        done.write_text(json.dumps(record, indent=2))
        return LaunchResult(run_dir.name, DONE, log_file, 0, seconds, metrics, resumed)

    def one(index: int, run_dir: Path, command: list[str]) -> LaunchResult:
        result = launch(run_dir, command)
        say(result.line(index, total))
        return result

    pool = ThreadPoolExecutor(max_workers=max(1, len(gpus)))
    futures = [pool.submit(one, i, run_dir, cmd) for i, (run_dir, cmd) in enumerate(runs)]
    try:
        results = [f.result() for f in futures]
    except (KeyboardInterrupt, Interrupted) as err:
        say("stopping: interrupting every run (each keeps its last checkpoint)")
        groups.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        raise Interrupted("interrupted; rerun the same command to resume") from err
    pool.shutdown()
    return results
