"""Sweep files (``sweeps/*.yaml``, W&B sweep configs): read, check, expand, and turn into
the command lines ``wandb agent`` runs.

The expansion is W&B's grid order, written out here so that W&B's ``sweeps`` engine (which
pins ``numpy<2``) is no dependency: parameters sorted by name, the cartesian product of their
``values`` with the first parameter varying slowest, repeated values (equal as YAML) once,
constant ``value`` parameters in every run. ``tests/test_sweeps.py`` checks it against the
engine on every file in ``sweeps/``. A :class:`Shard` of a grid is every N-th of its cells,
for running one grid as N jobs (a SLURM array).
"""

from __future__ import annotations

import itertools
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = [
    "Cell",
    "Shard",
    "SweepConfigError",
    "agent_command",
    "configured_root",
    "expand",
    "gradtrace_args",
    "load_sweep",
    "sweep_root",
    "validate",
    "with_ddp",
]

METHODS = ("grid", "random", "bayes")
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

SWEEPS_ROOT = Path("runs/sweeps")
ROOT_OPTION = "--trainer.default_root_dir"
_Item = TypeVar("_Item")


class SweepConfigError(ValueError):
    """A sweep file that W&B or the local runner cannot use."""


def validate(config: Mapping[str, Any], *, source: str = "sweep config") -> None:
    """Raise :class:`SweepConfigError` listing every problem that keeps ``config`` from running
    the CLI: the method, the shape of ``parameters`` (each a mapping with ``value``,
    ``values`` or a distribution) and a ``command`` holding ``${args}``. W&B's server checks
    the rest when the sweep is created."""
    problems = []
    if config.get("method") not in METHODS:
        problems.append(f"method must be one of {', '.join(METHODS)}; got {config.get('method')!r}")
    parameters = config.get("parameters")
    if not isinstance(parameters, Mapping) or not parameters:
        problems.append("parameters must be a non-empty mapping of parameter names to specs")
        parameters = {}
    for name, spec in parameters.items():
        if not isinstance(spec, Mapping):
            problems.append(f"parameter {name!r} must be a mapping such as {{values: [1, 2]}}")
        elif "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
            problems.append(f"parameter {name!r}: values must be a non-empty list")
        elif not {"value", "values", "distribution", "min", "parameters"} & set(spec):
            problems.append(f"parameter {name!r} needs value, values or a distribution")
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
    """One run of a grid, as W&B proposes it: ``{parameter: {"value": v}}`` by name."""

    config: dict[str, dict[str, Any]]

    @property
    def params(self) -> dict[str, Any]:
        """``{parameter: value}``."""
        return {key: spec["value"] for key, spec in self.config.items()}


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``K/N``, 0-based, as a SLURM array's task ids): the cells
    whose position ``i`` in grid order has ``i % count == index``. The N shards of a grid
    hold each of its cells exactly once."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"--shard expects K/N with 0 <= K < N; got '{self}'")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"1/4"`` -> ``Shard(1, 4)``; anything else raises ``ValueError`` with the one line
        the command prints."""
        match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
        if match is None:
            raise ValueError(f"--shard expects K/N with 0 <= K < N; got {text!r}")
        return cls(int(match[1]), int(match[2]))

    def select(self, items: Sequence[_Item]) -> list[_Item]:
        """This shard's items of ``items`` (cells, or runs, in grid order)."""
        return list(items[self.index :: self.count])

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def _same_yaml(value: Any) -> str:
    # W&B's engine compares values by their YAML (ints and integer floats alike).
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return yaml.dump(value, default_flow_style=True, sort_keys=True)


def expand(config: Mapping[str, Any]) -> list[Cell]:
    """All runs of a grid sweep in W&B's order (see the module docstring).

    Raises :class:`SweepConfigError` for other methods (random and Bayes searches never run
    out) and for parameters a grid cannot hold (distributions, nested ``parameters``).
    """
    if config.get("method") != "grid":
        raise SweepConfigError(
            f"only grid sweeps can be expanded (and run locally); method is "
            f"{config.get('method')!r}"
        )
    names = sorted(config["parameters"])
    choices: list[list[Any]] = []
    for name in names:
        spec = config["parameters"][name]
        if "values" in spec:
            # As the engine: first occurrence's place, last occurrence's value.
            choices.append(list({_same_yaml(v): v for v in spec["values"]}.values()))
        elif "value" in spec:
            choices.append([spec["value"]])
        else:
            raise SweepConfigError(
                f"parameter {name!r}: a grid takes `values` or `value`, got {sorted(spec)}"
            )
    return [
        Cell({name: {"value": value} for name, value in zip(names, combination)})
        for combination in itertools.product(*choices)
    ]


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


def gradtrace_args(command: Sequence[str]) -> list[str]:
    """The arguments after ``-m gradtrace`` in a sweep command (subcommand first)."""
    command = list(command)
    for i in range(len(command) - 1):
        if command[i] == "-m" and command[i + 1] == "gradtrace":
            return command[i + 2 :]
    raise SweepConfigError(
        f"the command must run `python -m gradtrace <subcommand> ...`; got {command}"
    )


def configured_root(config: Mapping[str, Any]) -> Path | None:
    """The ``--trainer.default_root_dir`` the sweep's command sets, or ``None``."""
    command = [str(c) for c in config.get("command") or []]
    found = None
    for i, arg in enumerate(command):
        if arg.startswith(f"{ROOT_OPTION}="):
            found = arg.split("=", 1)[1]
        elif arg == ROOT_OPTION and i + 1 < len(command):
            found = command[i + 1]
    return None if found is None else Path(found)


def sweep_root(config: Mapping[str, Any], path: str | Path) -> Path:
    """The sweep's output folder: :func:`configured_root`, else ``runs/sweeps/<file stem>``."""
    return configured_root(config) or SWEEPS_ROOT / Path(path).stem


def with_ddp(config: Mapping[str, Any], processes: int) -> dict[str, Any]:
    """``config`` with each run as one DDP run over ``processes`` devices (GPUs, or CPU
    processes with ``--trainer.accelerator=cpu``): ``--trainer.devices=N
    --trainer.strategy=ddp --trainer.sync_batchnorm=true`` replace the command's own device
    settings. The global batch stays what the command says: the CLI splits
    ``--data.batch_size`` equally over the processes (:mod:`gradtrace.cli.main`). A batch size in
    the command or the grid that does not split is refused here, before any run starts.
    """
    if processes < 2:
        raise SweepConfigError(f"DDP needs at least 2 processes; got {processes}")
    command = [str(c) for c in config["command"]]
    sizes = [int(c.split("=", 1)[1]) for c in command if c.startswith("--data.batch_size=")]
    spec = config.get("parameters", {}).get("data.batch_size", {})
    sizes += [int(v) for v in spec.get("values", [spec["value"]] if "value" in spec else [])]
    for size in sizes:
        if size % processes:
            raise SweepConfigError(
                f"the global batch {size} does not split into {processes} equal per-process batches"
            )
    pinned = ("--trainer.devices=", "--trainer.strategy=", "--trainer.sync_batchnorm=")
    out = [c for c in command if not c.startswith(pinned)]
    at = out.index("${args}")
    out[at:at] = [
        f"--trainer.devices={processes}",
        "--trainer.strategy=ddp",
        "--trainer.sync_batchnorm=true",
    ]
    return {**config, "command": out}
