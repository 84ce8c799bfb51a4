"""W&B sweeps of the study: validate, expand and run them, on W&B agents or locally.

The grids live in ``sweeps/*.yaml`` (W&B sweep configs). Their ``command`` runs the CLI the
way ``wandb agent`` builds it: ``${env} ${interpreter} -m gradtrace fit <fixed args> ${args}``,
where ``${args}`` becomes ``--<parameter>=<value>`` for every parameter of the run (for
example ``--model.depth=38 --model.batch_norm=True``; the CLI reads ``True``/``False`` as
booleans and a ``{...}`` value as a YAML mapping). Every command pins one device per run
(``--trainer.devices=1``); ``--ddp N`` runs each cell as one DDP run over N devices with the
same global batch (:func:`gradtrace.sweeps.grid.with_ddp`).

Each run lands in its own directory, named by :mod:`gradtrace.cli.run_identity` (a readable
prefix and a hash of the resolved settings; the W&B run id under an agent).

Subcommands (``python -m gradtrace.sweeps ...``, or ``make sweep`` /
``make sweep-local``):

``agents SWEEP [--gpus 0,1,2,3] [--ddp N] [--sweep-id [[ENTITY/]PROJECT/]ID]``
    Create the sweep on the W&B server (needs ``wandb login`` and network; or join one with
    ``--sweep-id``) and start one ``wandb agent`` per listed GPU (per N GPUs with ``--ddp``);
    the exit status is 1 when an agent failed (see :mod:`gradtrace.sweeps.agents`).
``local SWEEP [--gpus 0,1] [--ddp N] [--root DIR] [--shard K/N] [-- OVERRIDES...]``
    No W&B server: expand the grid and run each cell as a subprocess, logging CSV and W&B
    offline; one cell per GPU (or group of N) at a time with ``--gpus``, one after the other
    without. ``--shard K/N`` runs only shard K (0-based) of N of the grid: the cells whose
    index i in grid order has i % N == K (one SLURM array task each: ``--shard
    $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``). Each cell's output goes to its
    ``<run dir>/launch.log``; the command prints one line per cell as it ends (done, failed
    with its log's last error line, skipped, resumed) and a summary. A failed cell does not
    stop the rest; the exit status is 1 if any failed. A finished cell writes
    ``<run dir>/done.json``; a rerun skips those and resumes the others from their
    ``last.ckpt``.
``show SWEEP``
    Validate, print the number of runs and each run's command line.

Ctrl-C stops every agent or cell and its training processes, and exits with status 130. Bad
input (a sweep file, GPU list or ``--shard`` that cannot run) exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from gradtrace.sweeps.agents import gpu_groups, launch_agents
from gradtrace.sweeps.grid import (
    ROOT_OPTION,
    Shard,
    SweepConfigError,
    agent_command,
    configured_root,
    expand,
    gradtrace_args,
    load_sweep,
    sweep_root,
    with_ddp,
)
from gradtrace.sweeps.launch import (
    LOG_FILE,
    RESUME_ARGUMENT,
    Interrupted,
    parse_gpus,
    run_cells,
    split_run_arguments,
)
from gradtrace.sweeps.outcome import DONE, FAILED, LaunchResult, summary_line

__all__ = ["local_runs", "main", "run_local"]


def local_runs(
    path: str | Path,
    *,
    ddp: int = 1,
    root: str | Path | None = None,
    overrides: Sequence[str] = (),
    use_wandb: bool = True,
) -> tuple[Path, list[tuple[Path, list[str]]]]:
    """The output folder and the ``(run directory, command)`` of every cell of the grid.

    Each command is :func:`~gradtrace.sweeps.grid.agent_command` (with this interpreter)
    plus ``--trainer.default_root_dir=<root>`` (unless the command has it already),
    ``--wandb=true`` (unless ``use_wandb`` is false), ``overrides`` (appended last so they
    win) and ``--ckpt_path=last`` when the run has a checkpoint to resume. ``root`` defaults
    to :func:`~gradtrace.sweeps.grid.sweep_root`. The run directory is the CLI's own
    (:func:`gradtrace.cli.trainer_cli.run_directory`).
    """
    from gradtrace.cli.trainer_cli import last_checkpoint, run_directory

    config = load_sweep(path)
    if ddp > 1:
        config = with_ddp(config, ddp)
    cells = expand(config)
    if any(o.startswith((ROOT_OPTION, "--run_name")) for o in overrides):
        raise ValueError(
            "give the output folder with --root; run names come from the settings "
            "(do not override --trainer.default_root_dir or --run_name)"
        )
    own_root = configured_root(config)
    root = Path(root or sweep_root(config, path))
    runs: list[tuple[Path, list[str]]] = []
    seen: dict[Path, dict] = {}
    for cell in cells:
        command = agent_command(config, cell, interpreter=sys.executable)
        if own_root != root:
            command.append(f"{ROOT_OPTION}={root}")
        command += ["--wandb=true"] if use_wandb else []
        command += list(overrides)
        run_dir = run_directory(gradtrace_args(command))
        if run_dir in seen:
            raise SweepConfigError(
                f"two cells would share the run directory {run_dir}: {seen[run_dir]} and "
                f"{cell.params}"
            )
        seen[run_dir] = cell.params
        if last_checkpoint(run_dir) is not None:
            command.append(RESUME_ARGUMENT)
        runs.append((run_dir, command))
    return root, runs


def run_local(
    path: str | Path,
    *,
    gpus: Sequence[str] = (),
    ddp: int = 1,
    root: str | Path | None = None,
    overrides: Sequence[str] = (),
    use_wandb: bool = True,
    dry_run: bool = False,
    shard: Shard | None = None,
    echo: Callable[[str], None] = print,
) -> list[LaunchResult]:
    """Run the cells of the grid in ``path`` without a W&B server (``sweep local``): all of
    them, or ``shard``'s; see :func:`local_runs` for the commands. ``gpus`` run one cell per
    GPU (per ``ddp`` GPUs). Prints a line on what runs where, one line per cell as it ends
    and a summary."""
    slots = gpu_groups(list(gpus), ddp) if gpus else []  # bad GPU lists stop before parsing
    root, runs = local_runs(path, ddp=ddp, root=root, overrides=overrides, use_wandb=use_wandb)
    # Every cell's run directory was computed: cells of two shards never share one.
    picked = shard.select(runs) if shard else runs
    which = f"shard {shard}: {len(picked)} of {len(runs)} runs" if shard else f"{len(runs)} runs"
    where = f"on GPUs {' '.join(slots)}" if slots else "one after the other"
    logs = f"{root}/<run>/{LOG_FILE}"
    echo(f"{path}: {which}, {where}, under {root} (each run's output: {logs})")
    if dry_run:
        for run_dir, command in picked:
            echo(f"{run_dir.name}: {shlex.join(command)}")
        return []
    env = dict(os.environ)
    env.pop("WANDB_SWEEP_ID", None)  # not an agent run: no W&B logger unless asked for
    env.pop("WANDB_RUN_ID", None)
    if use_wandb:
        env["WANDB_MODE"] = "offline"
    results = run_cells(picked, gpus=slots, env=env, echo=echo)
    echo(summary_line(str(path), results, logs))
    if use_wandb and any(r.status == DONE for r in results):
        echo(f"W&B offline runs: upload them with `wandb sync {root}/*/wandb/offline-*`")
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gradtrace.sweeps",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides for every local run go after `--`, e.g. "
        "`local sweeps/table1.yaml -- --trainer.max_steps=2 --data.dataset=synthetic`.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    ddp_help = "run each cell as one DDP run over N devices, same global batch (default 1)"
    agents = sub.add_parser("agents", help="create the sweep on W&B, one agent per GPU")
    agents.add_argument("sweep", type=Path)
    agents.add_argument("--gpus", type=parse_gpus, default=[], help="e.g. 0,1,2,3")
    agents.add_argument("--ddp", type=int, default=1, metavar="N", help=ddp_help)
    agents.add_argument("--project", default="gradtrace")
    agents.add_argument("--entity", default=None)
    agents.add_argument(
        "--sweep-id", default=None, help="join this sweep: ID, project/ID or entity/project/ID"
    )
    agents.add_argument("--count", type=int, default=None, help="runs per agent (default: all)")
    local = sub.add_parser("local", help="run the grid here, without a W&B server")
    local.add_argument("sweep", type=Path)
    local.add_argument("--gpus", type=parse_gpus, default=[], help="e.g. 0,1 (default: CPU)")
    local.add_argument("--ddp", type=int, default=1, metavar="N", help=ddp_help)
    local.add_argument("--root", type=Path, default=None, help="output folder")
    local.add_argument("--no-wandb", action="store_true", help="CSV only, no W&B offline run")
    local.add_argument("--dry-run", action="store_true", help="print the commands only")
    local.add_argument(
        "--shard",
        default=None,
        metavar="K/N",
        help="run only shard K (0-based) of N: the cells i with i %% N == K (SLURM arrays)",
    )
    show = sub.add_parser("show", help="validate and print the grid's commands")
    show.add_argument("sweep", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; see the module docstring. Returns the exit status."""
    argv, overrides = split_run_arguments(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if overrides and args.action != "local":
        parser.error("overrides after `--` apply to `local` only")
    # A scheduler's SIGTERM stops the children like Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if args.action == "show":
            config = load_sweep(args.sweep)
            cells = expand(config)
            print(f"{args.sweep}: {len(cells)} runs")
            for cell in cells:
                print(shlex.join(agent_command(config, cell)))
            return 0
        if args.action == "local":
            shard = None if args.shard is None else Shard.parse(args.shard)
            results = run_local(
                args.sweep,
                gpus=args.gpus,
                ddp=args.ddp,
                root=args.root,
                overrides=overrides,
                use_wandb=not args.no_wandb,
                dry_run=args.dry_run,
                shard=shard,
            )
            return 1 if any(r.status == FAILED for r in results) else 0
        return launch_agents(
            args.sweep,
            gpus=args.gpus,
            ddp=args.ddp,
            project=args.project,
            entity=args.entity,
            sweep_id=args.sweep_id,
            count=args.count,
        )
    except (Interrupted, KeyboardInterrupt) as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 130
    except (SweepConfigError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
