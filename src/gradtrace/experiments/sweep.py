"""W&B sweeps of the study: validate, expand and run them, on W&B agents or locally.

The grids live in ``sweeps/*.yaml`` (W&B sweep configs). Their ``command`` runs the CLI the
way ``wandb agent`` builds it: ``${env} ${interpreter} -m gradtrace fit <fixed args> ${args}``,
where ``${args}`` becomes ``--<parameter>=<value>`` for every parameter of the run (for
example ``--model.depth=38 --model.batch_norm=True``; the CLI reads ``True``/``False`` as
booleans and a ``{...}`` value as a YAML mapping).

W&B's own code does the work: the ``sweeps`` engine validates a file
(``schema_violations_from_proposed_config``) and proposes the grid's runs one by one
(``next_run``, given the runs proposed so far), and ``wandb``'s agent helpers turn a run's
parameters into arguments (``create_sweep_command_args``). So a local run is the command a
W&B agent would start, plus ``--run_name`` (see :func:`cell_name`), ``--wandb=true`` (W&B in
offline mode) and any overrides.

Subcommands (``python -m gradtrace.experiments.sweep ...``, or ``make sweep`` /
``make sweep-local``):

``agents SWEEP [--gpus 0,1,2,3]``
    Create the sweep on the W&B server (needs ``wandb login`` and network; or join one with
    ``--sweep-id``) and start one ``wandb agent`` per listed GPU, each with
    ``CUDA_VISIBLE_DEVICES`` set to its GPU; wait for them and report their exit codes.
``local SWEEP [--gpus 0,1] [--root DIR] [-- OVERRIDES...]``
    No W&B server: expand the grid with the engine and run each cell as a subprocess,
    logging CSV and W&B offline; one cell per GPU at a time with ``--gpus``, one after the
    other without. A failed cell is reported (name, exit code, log file) and the rest go
    on; the exit status is 1 if any failed. A cell that finished writes
    ``<root>/<cell>/done.json`` (exit code, time, final metrics); a rerun skips those cells
    and resumes the others from their ``last.ckpt`` (``--ckpt_path=last``).
``show SWEEP``
    Validate, print the number of runs and each run's command line.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Cell",
    "CellResult",
    "SweepConfigError",
    "agent_command",
    "cell_name",
    "expand",
    "final_metrics",
    "launch_agents",
    "load_sweep",
    "main",
    "parse_gpus",
    "run_cells",
    "run_local",
    "validate",
]

DONE_FILE = "done.json"
LOG_FILE = "sweep-local.log"
# The command macros filled in here: those of wandb's agent but ${args_json_file}.
_LOCAL_MACROS = (
    "env",
    "interpreter",
    "program",
    "args",
    "args_no_equals",
    "args_no_hyphens",
    "args_no_boolean_flags",
    "args_json",
    "args_append_hydra",
    "args_override_hydra",
)
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._=,+-]")


class SweepConfigError(ValueError):
    """A sweep file that W&B's engine (or the local runner) cannot use."""


def _engine() -> Any:
    """W&B's ``sweeps`` package, without the pydantic-v2 notices its import prints."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps


# --------------------------------------------------------------------------------------------
# Reading, validating and expanding a sweep file


def validate(config: Mapping[str, Any], *, source: str = "sweep config") -> None:
    """Raise :class:`SweepConfigError` listing what W&B's ``sweeps`` engine rejects in
    ``config``, or what keeps it from running the CLI (no ``command`` with ``${args}``)."""
    problems = list(_engine().schema_violations_from_proposed_config(dict(config)))
    command = config.get("command")
    if not isinstance(command, list) or "${args}" not in command:
        problems.append(
            "command must be a list containing '${args}' (where the agent puts the run's "
            "--<parameter>=<value> arguments), e.g. [${env}, ${interpreter}, -m, gradtrace, "
            "fit, ${args}]"
        )
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise SweepConfigError(f"{source} is not a valid W&B sweep:\n{listed}")


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read and :func:`validate` a sweep YAML file; errors name the file and every problem."""
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.name for p in Path("sweeps").glob("*.yaml"))
        hint = f"; sweeps here: {', '.join(shipped)}" if shipped else ""
        raise SweepConfigError(f"no sweep file {str(path)!r}{hint}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(config, dict):
        raise SweepConfigError(f"{path} must hold a mapping (a W&B sweep config)")
    validate(config, source=str(path))
    return config


@dataclass(frozen=True)
class Cell:
    """One run of a grid: its parameters (engine order) and its unique name."""

    name: str
    params: dict[str, Any]
    config: dict[str, dict[str, Any]] = field(repr=False)
    """The run's config as the engine proposes it (``{parameter: {"value": v}}``)."""


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def _name_parts(key: str, value: Any) -> list[str]:
    if isinstance(value, Mapping):
        return [part for k, v in value.items() for part in _name_parts(str(k), v)]
    return [f"{key.rsplit('.', 1)[-1]}={_format_value(value)}"]


def cell_name(params: Mapping[str, Any]) -> str:
    """A readable, filesystem-safe run name from a cell's parameters.

    ``key=value`` for each parameter (the last part of a dotted key), joined by commas;
    mapping values contribute their own items: ``{"model.depth": 38, "model.lr": 0.01}``
    gives ``depth=38,lr=0.01``. Characters other than letters, digits and ``._=,+-`` become
    ``_``.
    """
    parts = [part for key, value in params.items() for part in _name_parts(key, value)]
    return _UNSAFE_NAME_CHARS.sub("_", ",".join(parts))


def expand(config: Mapping[str, Any]) -> list[Cell]:
    """All runs of a grid sweep, proposed by W&B's engine, in its order.

    ``sweeps.next_run`` is asked for the next run given the runs proposed so far, until it
    has none left. Raises :class:`SweepConfigError` for a non-grid sweep (random and Bayes
    searches never run out) or when two cells would get the same :func:`cell_name`.
    """
    sweeps = _engine()
    if config.get("method") != "grid":
        raise SweepConfigError(
            f"only grid sweeps can be expanded (and run locally); method is "
            f"{config.get('method')!r}"
        )
    proposed: list[Any] = []  # sweeps.SweepRun
    while (run := sweeps.next_run(dict(config), proposed)) is not None:
        proposed.append(run)
    cells = []
    seen: dict[str, dict[str, Any]] = {}
    order = list(config["parameters"])  # names follow the file's order, not the engine's
    for run in proposed:
        keys = [k for k in order if k in run.config] + [k for k in run.config if k not in order]
        params = {key: run.config[key]["value"] for key in keys}
        name = cell_name(params)
        if name in seen:
            raise SweepConfigError(
                f"two runs get the same name {name!r}: {seen[name]} and {params}; rename "
                "parameters so that their last dotted parts differ"
            )
        seen[name] = params
        cells.append(Cell(name=name, params=params, config=dict(run.config)))
    return cells


def agent_command(config: Mapping[str, Any], cell: Cell, interpreter: str = "python") -> list[str]:
    """The command line ``wandb agent`` starts for ``cell`` (``wandb/wandb_agent.py``).

    ``${envvar:NAME}`` macros are filled in by wandb's ``create_sweep_command``, the
    ``${args...}`` macros by its ``create_sweep_command_args``; ``${env}`` is
    ``/usr/bin/env`` (not on Windows) and ``${interpreter}`` is ``python`` as for the agent
    (pass ``interpreter=sys.executable`` to pin this one).
    """
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    command = create_sweep_command(list(config.get("command") or []))
    values: dict[str, list[str]] = {
        key: value
        for key, value in create_sweep_command_args({"args": cell.config}).items()
        if isinstance(value, list)
    }
    values["interpreter"] = [interpreter]
    values["program"] = [str(config["program"])] if config.get("program") else []
    values["env"] = ["/usr/bin/env"] if platform.system() != "Windows" else []
    out: list[str] = []
    for chunk in map(str, command):
        if chunk.startswith("${") and chunk.endswith("}"):
            macro = chunk[2:-1]
            if macro not in _LOCAL_MACROS:
                raise SweepConfigError(
                    f"command macro {chunk} is not supported here; use one of "
                    f"{', '.join('${' + m + '}' for m in _LOCAL_MACROS)}"
                )
            out += values.get(macro, [])
        else:
            out.append(chunk)
    return out


# --------------------------------------------------------------------------------------------
# Running cells locally


@dataclass
class CellResult:
    """How one cell ended: ``status`` is ``done``, ``skipped`` or ``failed``."""

    name: str
    status: str
    exit_code: int | None = None
    seconds: float = 0.0
    log_file: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def parse_gpus(value: str | None) -> list[str]:
    """``"0,1,2,3"`` -> ``["0", "1", "2", "3"]``; ``None`` or ``""`` -> ``[]``.

    Any token ``CUDA_VISIBLE_DEVICES`` takes (index or ``GPU-<uuid>``); repeating one runs two
    cells (or agents) on that GPU at once.
    """
    if not value:
        return []
    gpus = [token.strip() for token in value.split(",")]
    if any(not token or re.search(r"\s", token) for token in gpus):
        raise ValueError(f"gpus must be a comma-separated list such as 0,1,2,3; got {value!r}")
    return gpus


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged value of every metric (but the per-layer ``grad_flow/*``) over the
    versions of ``<run_dir>/version_*`` in order; ``{}`` when nothing was logged."""
    versions = sorted(run_dir.glob("version_*/metrics.csv"), key=lambda p: _version(p.parent))
    last: dict[str, float] = {}
    for path in versions:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key and value not in ("", None) and not key.startswith("grad_flow/"):
                        last[key] = float(value)
    return {k: v for k, v in last.items() if math.isfinite(v)}


def _version(path: Path) -> int:
    suffix = path.name.removeprefix("version_")
    return int(suffix) if suffix.isdigit() else -1


def run_cells(
    cells: Sequence[tuple[str, list[str]]],
    root: Path,
    *,
    gpus: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    echo: Callable[[str], None] = print,
) -> list[CellResult]:
    """Run ``(name, command)`` pairs as subprocesses, writing under ``root/<name>/``.

    A cell with ``root/<name>/done.json`` is skipped. Otherwise its output is appended to
    ``root/<name>/sweep-local.log``; exit code 0 writes ``done.json`` (command, seconds,
    final metrics from ``metrics.csv``). With ``gpus``, as many cells run at once as there
    are entries, each with ``CUDA_VISIBLE_DEVICES`` set to its GPU; without, one at a time.
    A failure is reported and the others go on.
    """
    lock = threading.Lock()
    free: queue.Queue[str | None] = queue.Queue()
    for gpu in gpus or [None]:
        free.put(gpu)
    total = len(cells)

    def say(message: str) -> None:
        with lock:
            echo(message)

    def one(index: int, name: str, command: list[str]) -> CellResult:
        cell_dir = root / name
        done = cell_dir / DONE_FILE
        tag = f"[{index + 1}/{total}] {name}"
        if done.is_file():
            recorded = json.loads(done.read_text())
            say(f"{tag}: skipped, finished before ({done})")
            return CellResult(name, "skipped", 0, log_file=None, metrics=recorded["metrics"])
        cell_dir.mkdir(parents=True, exist_ok=True)
        log_file = cell_dir / LOG_FILE
        gpu = free.get()
        try:
            child_env = dict(os.environ if env is None else env)
            if gpu is not None:
                child_env["CUDA_VISIBLE_DEVICES"] = gpu
            say(f"{tag}: started{'' if gpu is None else f' on GPU {gpu}'}, log {log_file}")
            start = time.perf_counter()
            with log_file.open("a") as log:
                log.write(f"\n$ {shlex.join(command)}\n")
                log.flush()
                code = subprocess.run(
                    command, stdout=log, stderr=subprocess.STDOUT, env=child_env, check=False
                ).returncode
            seconds = time.perf_counter() - start
        finally:
            free.put(gpu)
        if code != 0:
            say(f"{tag}: FAILED with exit code {code} after {seconds:.0f} s; log: {log_file}")
            return CellResult(name, "failed", code, seconds, log_file)
        metrics = final_metrics(cell_dir)
        done.write_text(
            json.dumps(
                {
                    "name": name,
                    "command": command,
                    "exit_code": 0,
                    "seconds": round(seconds, 1),
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "metrics": metrics,
                },
                indent=2,
            )
        )
        shown = f", val/acc {metrics['val/acc']:.4f}" if "val/acc" in metrics else ""
        say(f"{tag}: done in {seconds:.0f} s{shown}")
        return CellResult(name, "done", 0, seconds, log_file, metrics)

    with ThreadPoolExecutor(max_workers=max(1, len(gpus))) as pool:
        futures = [pool.submit(one, i, name, cmd) for i, (name, cmd) in enumerate(cells)]
        return [f.result() for f in futures]


def _root_of(command: Sequence[str]) -> str | None:
    found = None
    for i, arg in enumerate(command):
        if arg.startswith("--trainer.default_root_dir="):
            found = arg.split("=", 1)[1]
        elif arg == "--trainer.default_root_dir" and i + 1 < len(command):
            found = command[i + 1]
    return found


def run_local(
    path: str | Path,
    *,
    gpus: Sequence[str] = (),
    root: str | Path | None = None,
    overrides: Sequence[str] = (),
    use_wandb: bool = True,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> list[CellResult]:
    """Run every cell of the grid in ``path`` without a W&B server (``sweep local``).

    Each cell runs :func:`agent_command` (with this interpreter) plus
    ``--trainer.default_root_dir=<root>`` (unless the command has it already),
    ``--run_name=<cell> --ckpt_path=last``,
    ``--wandb=true`` with ``WANDB_MODE=offline`` (unless ``use_wandb`` is false) and
    ``overrides``, appended last so they win. ``root`` defaults to the command's
    ``--trainer.default_root_dir``, else ``runs/sweeps/<file stem>``.
    """
    config = load_sweep(path)
    cells = expand(config)
    if any(o.startswith("--trainer.default_root_dir") for o in overrides):
        raise ValueError("give the output folder with --root, not --trainer.default_root_dir")
    if any(o.startswith("--run_name") for o in overrides):
        raise ValueError("--run_name is set per cell from its parameters; do not override it")
    own_root = _root_of(agent_command(config, cells[0], interpreter=sys.executable))
    root = Path(root or own_root or Path("runs/sweeps") / Path(path).stem)
    commands = []
    for cell in cells:
        command = agent_command(config, cell, interpreter=sys.executable)
        if own_root is None or Path(own_root) != root:
            command.append(f"--trainer.default_root_dir={root}")
        command += [f"--run_name={cell.name}", "--ckpt_path=last"]
        command += ["--wandb=true"] if use_wandb else []
        commands.append((cell.name, command + list(overrides)))
    where = f"on GPUs {','.join(gpus)}" if gpus else "one after the other"
    echo(f"{path}: {len(cells)} runs, {where}, under {root}")
    if dry_run:
        for name, command in commands:
            echo(f"{name}: {shlex.join(command)}")
        return []
    env = dict(os.environ)
    env.pop("WANDB_SWEEP_ID", None)  # not an agent run: no W&B logger unless asked for
    if use_wandb:
        env["WANDB_MODE"] = "offline"
    results = run_cells(commands, root, gpus=gpus, env=env, echo=echo)
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    echo(
        f"{path}: {counts['done']} done, {counts['skipped']} skipped (finished before), "
        f"{counts['failed']} failed"
    )
    for r in results:
        if r.status == "failed":
            echo(f"  FAILED {r.name}: exit code {r.exit_code}, log {r.log_file}")
    if use_wandb and counts["done"]:
        echo(f"W&B offline runs: upload them with `wandb sync {root}/*/version_*/wandb/offline-*`")
    return results


# --------------------------------------------------------------------------------------------
# W&B agents


def _wandb_executable() -> str:
    beside = Path(sys.executable).with_name("wandb")
    found = str(beside) if beside.is_file() else shutil.which("wandb")
    if found is None:
        raise RuntimeError("the `wandb` command was not found; pip install wandb")
    return found


def launch_agents(
    path: str | Path,
    *,
    gpus: Sequence[str] = (),
    project: str = "gradtrace",
    entity: str | None = None,
    sweep_id: str | None = None,
    count: int | None = None,
    wandb_executable: str | None = None,
    echo: Callable[[str], None] = print,
) -> int:
    """Create the sweep in ``path`` on W&B (or join ``sweep_id``) and run one agent per GPU.

    Each ``wandb agent`` gets ``CUDA_VISIBLE_DEVICES=<its GPU>`` (one agent and no
    restriction without ``gpus``) and this interpreter's folder first on ``PATH``, so the
    agent's ``python`` is this environment's. Waits for all agents; returns 0 when all
    exited 0, else 1.
    """
    config = load_sweep(path)
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        raise RuntimeError(
            f"WANDB_MODE={os.environ['WANDB_MODE']}: W&B agents need the W&B server; "
            "run the grid without one with `make sweep-local`"
        )
    executable = wandb_executable or _wandb_executable()
    if sweep_id is None:
        import wandb

        try:
            sweep_id = wandb.sweep(config, project=project, entity=entity)
        except Exception as err:  # login prompt refused, no network, server error
            raise RuntimeError(
                f"could not create the sweep on W&B ({type(err).__name__}: {err}). It needs "
                "`wandb login` (or WANDB_API_KEY) and network; without them use "
                "`make sweep-local`"
            ) from err
    target = "/".join(part for part in (entity, project, sweep_id) if part)
    command = [executable, "agent", *(["--count", str(count)] if count else []), target]
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    processes = []
    for gpu in gpus or [None]:
        agent_env = dict(env)
        if gpu is not None:
            agent_env["CUDA_VISIBLE_DEVICES"] = gpu
        echo(f"starting {shlex.join(command)}" + ("" if gpu is None else f" on GPU {gpu}"))
        processes.append((gpu, subprocess.Popen(command, env=agent_env)))
    failed = 0
    for gpu, process in processes:
        code = process.wait()
        where = "" if gpu is None else f" (GPU {gpu})"
        echo(f"agent{where} exited with code {code}")
        failed += code != 0
    echo(f"sweep {target}: {len(processes) - failed} of {len(processes)} agents exited cleanly")
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gradtrace.experiments.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides for every local run go after `--`, e.g. "
        "`local sweeps/table1.yaml -- --trainer.max_steps=2 --data.dataset=synthetic`.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    agents = sub.add_parser("agents", help="create the sweep on W&B, one agent per GPU")
    agents.add_argument("sweep", type=Path)
    agents.add_argument("--gpus", type=parse_gpus, default=[], help="e.g. 0,1,2,3")
    agents.add_argument("--project", default="gradtrace")
    agents.add_argument("--entity", default=None)
    agents.add_argument("--sweep-id", default=None, help="join this sweep instead of creating")
    agents.add_argument("--count", type=int, default=None, help="runs per agent (default: all)")
    local = sub.add_parser("local", help="run the grid here, without a W&B server")
    local.add_argument("sweep", type=Path)
    local.add_argument("--gpus", type=parse_gpus, default=[], help="e.g. 0,1 (default: CPU)")
    local.add_argument("--root", type=Path, default=None, help="output folder")
    local.add_argument("--no-wandb", action="store_true", help="CSV only, no W&B offline run")
    local.add_argument("--dry-run", action="store_true", help="print the commands only")
    show = sub.add_parser("show", help="validate and print the grid's commands")
    show.add_argument("sweep", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; see the module docstring. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, overrides = argv[:split], argv[split + 1 :]
    parser = _parser()
    args = parser.parse_args(argv)
    if overrides and args.action != "local":
        parser.error("overrides after `--` apply to `local` only")
    try:
        if args.action == "show":
            config = load_sweep(args.sweep)
            cells = expand(config)
            print(f"{args.sweep}: {len(cells)} runs")
            for cell in cells:
                print(f"{cell.name}: {shlex.join(agent_command(config, cell))}")
            return 0
        if args.action == "local":
            results = run_local(
                args.sweep,
                gpus=args.gpus,
                root=args.root,
                overrides=overrides,
                use_wandb=not args.no_wandb,
                dry_run=args.dry_run,
            )
            return 1 if any(r.status == "failed" for r in results) else 0
        return launch_agents(
            args.sweep,
            gpus=args.gpus,
            project=args.project,
            entity=args.entity,
            sweep_id=args.sweep_id,
            count=args.count,
        )
    except (SweepConfigError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
