"""The ``gradtrace`` command: ``fit``, ``validate``, ``test`` and ``predict``
(:mod:`gradtrace.cli.trainer_cli`), ``summary`` (a model's per-layer cost table) and
``compare`` (finished runs side by side, :mod:`gradtrace.cli.compare`). A user error is one
line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import yaml
from jsonargparse import ArgumentError

from gradtrace.cli.configs import resolve_config_args
from gradtrace.cli.trainer_cli import GradtraceCLI
from gradtrace.console import quiet_output
from gradtrace.data import ChecksumError, DataNotFoundError

__all__ = ["USER_ERRORS", "main", "summary_main"]


def summary_main(argv: Sequence[str]) -> int:
    """``gradtrace summary``: print a model's per-layer cost table."""
    from gradtrace.models import create_model, list_models, model_info
    from gradtrace.models.summary import summarize

    parser = argparse.ArgumentParser(
        prog="gradtrace summary",
        description="Per-layer output shape, activation memory (fp32), parameters and MACs.",
    )
    parser.add_argument("--arch", required=True, help=f"one of: {', '.join(list_models())}")
    parser.add_argument(
        "--input-size", type=int, nargs=3, metavar=("C", "H", "W"), help="default: the model's"
    )
    parser.add_argument("--num-classes", type=int, default=None)
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
            parser.error(f"--option expects KEY=VALUE, got {item!r}")
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


# What a user fixes by changing the command or providing data, not by reporting a bug.
USER_ERRORS = (ArgumentError, DataNotFoundError, ChecksumError)


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``gradtrace`` console script.

    A user error (a bad option or value, a missing config file, missing or corrupted data)
    prints one line, ``gradtrace: error: ...``, and exits with status 2; ``--debug`` shows
    its traceback instead. Anything else is a bug and keeps its traceback. Lightning's tips,
    device banners and other packages' deprecation warnings are not printed
    (:func:`gradtrace.console.quiet_output`).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if args[:1] == ["summary"]:
        raise SystemExit(summary_main(args[1:]))
    if args[:1] == ["compare"]:
        from gradtrace.cli.compare import compare_main

        raise SystemExit(compare_main(args[1:]))
    try:
        args = resolve_config_args(args)
        # LightningCLI reads sys.argv itself, and warns when it is also given args that may
        # disagree (a script or test calling main() has its own argv): run it on ours.
        saved_argv = sys.argv[:]
        sys.argv[1:] = args
        try:
            with quiet_output():
                GradtraceCLI()
        finally:
            if argv is not None:
                sys.argv[:] = saved_argv
    except USER_ERRORS as err:
        if debug:
            raise
        hint = ""
        if isinstance(err, ArgumentError):
            command = " ".join(["gradtrace", *[a for a in args[:1] if not a.startswith("-")]])
            hint = f" (all options: {command} --help)"
        print(f"gradtrace: error: {_one_line(err)}{hint}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as stop:
        # gradtrace's own one-line stops (an unknown config name, --ckpt_path last without a
        # checkpoint) carry their message: a user error like the others, status 2.
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
            raise SystemExit(2) from None
        raise
