"""The ``gradtrace`` command: ``fit``, ``validate``, ``test`` and ``predict``
(:mod:`gradtrace.cli.trainer_cli`), ``summary`` (a model's per-layer cost table),
``compare`` (finished runs side by side, :mod:`gradtrace.cli.compare`), ``probe`` (models'
gradient flow on one batch, without training, :mod:`gradtrace.cli.probe`) and ``coord-check``
(layers' scale across width, :mod:`gradtrace.cli.coord_check`). A user error is one line,
``gradtrace: error: ...``, and exit status 2 (:mod:`gradtrace.cli.errors`).
"""

from __future__ import annotations

import difflib
import signal
import sys
import textwrap
from collections.abc import Sequence

import yaml
from jsonargparse import ArgumentError
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gradtrace.cli.configs import list_configs, resolve_config_args
from gradtrace.cli.errors import CommandParser, UserError, one_line
from gradtrace.cli.trainer_cli import SUBCOMMAND_DESCRIPTIONS, GradtraceCLI
from gradtrace.console import quiet_output
from gradtrace.data import ChecksumError, DataNotFoundError

__all__ = ["COMMANDS", "USER_ERRORS", "main", "overview", "summary_main"]

COMMANDS = {
    **SUBCOMMAND_DESCRIPTIONS,
    "summary": "Print a model's per-layer output shape, activation memory, parameters and "
    "multiply-accumulates.",
    "compare": "Overlay the gradient flow of finished runs in one figure and print them side "
    "by side as a table.",
    "probe": "Measure models' gradient flow at initialisation (or after a few steps) on one "
    "batch, without training, and print them side by side with a figure.",
    "coord-check": "Train a model a few steps at several widths and print which layers' "
    "activations and updates grow or shrink with width (muP's coordinate check), with a figure.",
}
"""Every subcommand of ``gradtrace`` and the sentence ``gradtrace --help`` shows for it."""

# What a user fixes by changing the command or providing data, not by reporting a bug.
USER_ERRORS = (UserError, ArgumentError, DataNotFoundError, ChecksumError)


def overview() -> str:
    """What ``gradtrace --help`` prints: the subcommands, one sentence each."""
    width = max(map(len, COMMANDS))
    indent = " " * (width + 4)
    commands = [
        textwrap.fill(f"  {name:<{width}}  {text}", 88, subsequent_indent=indent)
        for name, text in COMMANDS.items()
    ]
    configs = f"Shipped configs (gradtrace fit --config NAME): {', '.join(list_configs())}."
    lines = [
        "usage: gradtrace COMMAND [options]    (gradtrace COMMAND --help lists its options)",
        "",
        "Train and evaluate gradtrace models and study how their gradients flow.",
        "",
        "commands:",
        *commands,
        "",
        textwrap.fill(configs, 88),
        "--debug (with any command) shows the traceback of a user error instead of one line.",
    ]
    return "\n".join(lines)


def _unknown_command(name: str) -> UserError:
    close = difflib.get_close_matches(name, COMMANDS, n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return UserError(
        f"unknown command {name!r}; {guess}commands: {', '.join(COMMANDS)} (gradtrace --help)"
    )


def summary_main(argv: Sequence[str]) -> int:
    """``gradtrace summary``: print a model's per-layer cost table."""
    from gradtrace.models import create_model, list_models, model_info
    from gradtrace.models.summary import summarize

    parser = CommandParser(
        prog="gradtrace summary",
        description=COMMANDS["summary"] + " Activation memory is for fp32 and one image.",
    )
    parser.add_argument(
        "--arch", required=True, help=f"the model, one of: {', '.join(list_models())}"
    )
    parser.add_argument(
        "--input-size",
        type=int,
        nargs=3,
        metavar=("C", "H", "W"),
        help="input channels, height and width (default: the model's own, e.g. 3 32 32)",
    )
    parser.add_argument(
        "--num-classes", type=int, default=None, help="classifier outputs (default: the model's)"
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option, YAML value, e.g. --option batch_norm=true (repeatable)",
    )
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(list(argv))
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--option expects KEY=VALUE; got {item!r}")
        options[key] = yaml.safe_load(value)
    try:
        info = model_info(args.arch)
        input_size = tuple(args.input_size or info.input_size)
        model = create_model(
            args.arch, num_classes=args.num_classes, in_chans=input_size[0], **options
        )
    except ValueError as err:
        parser.error(str(err))
    table = summarize(model.eval(), input_size)
    print(table.to_markdown() if args.markdown else table)
    return 0


def _run(args: list[str], argv_given: bool) -> None:
    command = args[0] if args else None
    if command in (None, "-h", "--help"):
        print(overview())
        raise SystemExit(0 if command else 2)
    if command == "summary":
        raise SystemExit(summary_main(args[1:]))
    if command == "compare":
        from gradtrace.cli.compare import compare_main

        raise SystemExit(compare_main(args[1:]))
    if command == "probe":
        from gradtrace.cli.probe import probe_main

        raise SystemExit(probe_main(args[1:]))
    if command == "coord-check":
        from gradtrace.cli.coord_check import coord_check_main

        raise SystemExit(coord_check_main(args[1:]))
    if command not in COMMANDS and not command.startswith("-"):
        raise _unknown_command(command)
    args = resolve_config_args(args)
    # LightningCLI reads sys.argv itself, and warns when it is also given args that may
    # disagree (a script or test calling main() has its own argv): run it on ours.
    saved_argv = sys.argv[:]
    sys.argv[1:] = args
    try:
        with quiet_output():
            GradtraceCLI()
    finally:
        if argv_given:
            sys.argv[:] = saved_argv


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``gradtrace`` console script.

    A user error (a bad option or value, an unknown command or config, missing or corrupted
    data, W&B without a login) prints one line, ``gradtrace: error: ...``, and exits with
    status 2; ``--debug`` shows its traceback instead. Anything else is a bug and keeps its
    traceback. Lightning's tips, device banners and other packages' deprecation warnings are
    not printed (:func:`gradtrace.console.quiet_output`).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        _run(args, argv_given=argv is not None)
    except SIGTERMException:
        # Lightning ends a SIGTERM'd fit (preemption, a job's time limit, a launcher stopping
        # it) as a plain exit, status 0: it would read as finished.
        print(
            "gradtrace: stopped by SIGTERM before the end; rerun the same command with "
            "--ckpt_path last to resume from the last epoch's checkpoint",
            file=sys.stderr,
        )
        raise SystemExit(128 + signal.SIGTERM) from None
    except USER_ERRORS as err:
        if debug:
            raise
        hint = ""
        if isinstance(err, ArgumentError):
            command = args[0] if args and args[0] in COMMANDS else ""
            hint = f" (all options: {' '.join(['gradtrace', command]).strip()} --help)"
        print(f"gradtrace: error: {one_line(err)}{hint}", file=sys.stderr)
        raise SystemExit(2) from None
