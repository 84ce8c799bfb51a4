"""Each layer's scale across width after a few training steps: ``gradtrace coord-check``.

``gradtrace coord-check vgg08 --widths 16,32,64,128`` builds the model at each width (the
option :data:`WIDTH_KNOBS` names for its family, or ``--knob``) and seed, runs
:func:`gradtrace.measure.coord_check.coord_check` on one batch (random images by default, or
the first training batch of a dataset), prints one row per layer (:func:`coord_check_table`:
how its output, the change of its output and its weight update scale with width, and whether
it grows, shrinks or stays flat) and draws them (:func:`gradtrace.plots.plot_coord_check`).
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gradtrace.cli.errors import CommandParser, UserError, require_matplotlib
from gradtrace.cli.model_inputs import (
    add_input_options,
    check_input_options,
    check_model_on_meta,
    dataset_batches,
    input_error,
    parse_model_spec,
    random_batches,
)
from gradtrace.data import ChecksumError, DataNotFoundError
from gradtrace.measure.coord_check import COORD_STATS, FLAT_SLOPE, CoordCheckResult, coord_check

__all__ = [
    "COORD_COLUMNS",
    "WIDTH_KNOBS",
    "coord_check_main",
    "coord_check_table",
    "write_coord_check_csv",
]

WIDTH_KNOBS: dict[str, str] = {
    "coursework_vgg": "width",
    "resnet_cifar": "width",
    "vit": "embed_dim",
}
"""Zoo family -> the model option that sets its width: the coursework VGG's filters, the CIFAR
ResNets' first stage (the others are 2x and 4x), the ViTs' embedding size."""

DESCRIPTION = (
    "Train a model a few steps on one batch at several widths and print, per layer, how its "
    "output, the change of its output since initialisation and its weight update scale with "
    "width (slopes on log-log axes; muP's coordinate check, 'Tensor Programs V', Yang et al. "
    "2022): a layer that grows with width under the standard parametrisation is one whose "
    "scale a wider network does not keep."
)

COORD_COLUMNS = (
    "layer",
    "activation RMS",
    "slope",
    "change RMS",
    "slope",
    "update slope",
    "verdict",
)
"""The table's columns (:func:`coord_check_table`)."""


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(item) for item in text.split(","))
    except ValueError:
        widths = ()
    if len(set(widths)) < 2 or min(widths) < 1:
        raise argparse.ArgumentTypeError(
            f"two or more distinct integers >= 1 separated by commas, e.g. 16,32,64; got {text!r}"
        )
    return tuple(sorted(set(widths)))


def _knob(name: str, family: str, knob: str | None) -> str:
    from gradtrace.models import list_models

    if knob is not None:
        return knob
    if family in WIDTH_KNOBS:
        return WIDTH_KNOBS[family]
    known = "; ".join(
        f"{', '.join(list_models(family=f))} ({option})" for f, option in WIDTH_KNOBS.items()
    )
    raise UserError(
        f"{name} has no known width option: name the model option that sets its width with "
        f"--knob, or check a model that has one: {known}"
    )


def _verdict(verdict: str, act_slope: float, change_slope: float) -> str:
    """The verdict and what drove it: ``grows (output, change)``."""
    sign = {"grows": 1.0, "shrinks": -1.0}.get(verdict)
    if sign is None:
        return verdict
    why = [
        name
        for name, slope in (("output", act_slope), ("change", change_slope))
        if sign * slope > FLAT_SLOPE
    ]
    return f"{verdict} ({', '.join(why)})"


def _range(values: Sequence[float]) -> str:
    """The median at the smallest and at the largest width: ``0.52 -> 1.9`` (``-``: not
    measured)."""
    if not (math.isfinite(values[0]) and math.isfinite(values[-1])):
        return "-"
    return f"{values[0]:.2g} -> {values[-1]:.2g}"


def _slope(value: float) -> str:
    return f"{value:+.2f}" if math.isfinite(value) else "-"


def coord_check_table(result: CoordCheckResult, *, markdown: bool = False) -> str:
    """One row per main-path layer (input first): its output's RMS at the smallest and the
    largest width and the slope of log RMS against log width, the same for the change of its
    output since initialisation, the slope of its weight update per entry, and its verdict
    (:meth:`~gradtrace.measure.coord_check.CoordCheckResult.verdicts`); medians over the seeds
    at the last step, with what drove it (``grows (output, change)``); plain aligned text or
    markdown."""
    act, change = result.medians("act_rms"), result.medians("change_rms")
    slopes = {stat: result.slopes(stat) for stat in COORD_STATS}
    verdicts = result.verdicts()
    cells = [
        [
            layer,
            _range(act[layer]),
            _slope(slopes["act_rms"][layer]),
            _range(change[layer]),
            _slope(slopes["change_rms"][layer]),
            _slope(slopes["update_rms"][layer]),
            _verdict(verdicts[layer], slopes["act_rms"][layer], slopes["change_rms"][layer]),
        ]
        for layer in result.layers
    ]
    if markdown:
        lines = ["| " + " | ".join(COORD_COLUMNS) + " |", "|---|---:|---:|---:|---:|---:|---|"]
        return "\n".join([*lines, *("| " + " | ".join(c) + " |" for c in cells)])
    widths = [max(len(c[i]) for c in [list(COORD_COLUMNS), *cells]) for i in range(7)]
    left = {0, 6}  # text columns; numbers are right-aligned

    def line(values: Sequence[str]) -> str:
        padded = [
            v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))
        ]
        return "  ".join(padded).rstrip()

    return "\n".join(line(c) for c in [list(COORD_COLUMNS), *cells])


def write_coord_check_csv(result: CoordCheckResult, path: str | Path, model: str) -> Path:
    """Every record (one per width, seed, step and main-path layer) with a ``model`` column."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["model", "width", "seed", "step", "layer", "depth", *COORD_STATS, "loss"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for record in result.records:
            writer.writerow({"model": model, **{k: record[k] for k in fields[1:]}})
    return path


def _parser() -> CommandParser:
    from gradtrace.models import list_models

    knobs = ", ".join(f"{family}: {option}" for family, option in WIDTH_KNOBS.items())
    parser = CommandParser(prog="gradtrace coord-check", description=DESCRIPTION)
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="a model name, optionally with options as YAML values: NAME[:KEY=VALUE,...], e.g. "
        f"vgg38:batch_norm=true; names: {', '.join(list_models())}",
    )
    parser.add_argument(
        "--widths",
        type=_widths,
        required=True,
        metavar="W,W,...",
        help="the widths, two or more, e.g. 16,32,64,128",
    )
    parser.add_argument(
        "--knob",
        metavar="OPTION",
        help=f"the model option the widths set (default: the family's; {knobs})",
    )
    parser.add_argument(
        "--steps", type=int, default=3, metavar="K", help="optimizer steps (default: 3)"
    )
    parser.add_argument(
        "--seeds", type=int, default=2, metavar="N", help="seeds 0..N-1 (default: 2)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, metavar="N", help="images (default: 32)"
    )
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    add_input_options(parser, figure="coord_check.png", models="the model")
    return parser


def _check_arguments(parser: CommandParser, args: Any) -> None:
    check_input_options(parser, args)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1; got {args.steps}")


def coord_check_main(argv: Sequence[str]) -> int:
    """``gradtrace coord-check``: print the table, write the figure (and with ``--csv`` the
    records)."""
    from gradtrace.models import create_model, model_info

    parser = _parser()
    args = parser.parse_args(list(argv))
    _check_arguments(parser, args)
    require_matplotlib("coord-check")
    label = args.model
    try:
        name, options = parse_model_spec(label)
        info = model_info(name)
        knob = _knob(name, info.family, args.knob)
        if knob in options:
            raise UserError(f"{label} sets {knob}, which --widths varies: leave it out of MODEL")
        if args.data != "random":
            batch_fn, input_size, classes = dataset_batches(args)
        else:
            batch_fn, input_size, classes = random_batches(args, info.input_size, info.num_classes)
        parameters = [
            check_model_on_meta(
                f"{label} at {knob}={width}", name, {**options, knob: width}, input_size, classes
            )
            for width in args.widths
        ]
        batch_fn(0)  # reads the data before any model runs
    except (ValueError, ChecksumError, DataNotFoundError) as err:
        # the data module's checks and reading, parse_model_spec, model_info
        raise input_error(err, "coord-check", args.data) from None

    device = torch.device(args.device)
    optimizer = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[args.optimizer]

    def build(width: int) -> torch.nn.Module:
        built = create_model(
            name, num_classes=classes, in_chans=input_size[0], **{**options, knob: width}
        )
        return built.to(device)

    try:
        result = coord_check(
            build,
            args.widths,
            lambda seed: tuple(t.to(device) for t in batch_fn(seed)),
            steps=args.steps,
            seeds=range(args.seeds),
            optimizer=lambda model: optimizer(model.parameters(), lr=args.lr),
        )
    except ValueError as err:  # layers that differ between widths, no main path
        raise UserError(f"{label}: {err}") from None

    widths = ", ".join(map(str, args.widths))
    seeds = f"{args.seeds} seed{'s' if args.seeds > 1 else ''}"
    steps = f"{args.steps} {args.optimizer} step{'s' if args.steps > 1 else ''}"
    data = "random images" if args.data == "random" else f"{args.data} (first training batch)"
    print(
        f"Coordinate check of {label} over {knob} {widths}: {steps} "
        f"(lr {args.lr:g}) on one batch of {args.batch_size} {data}, {seeds}, on {args.device}."
    )
    print(
        f"Parameters {parameters[0]:,} to {parameters[-1]:,}. Slopes of log RMS against log "
        f"width after step {args.steps}, medians over the seeds; |slope| <= {FLAT_SLOPE} is flat."
    )
    print(coord_check_table(result, markdown=args.markdown))
    verdicts = result.verdicts()
    for verdict in ("grows", "shrinks", "flat"):
        layers = [layer for layer in result.layers if verdicts[layer] == verdict]
        named = f": {', '.join(layers)}" if layers and verdict != "flat" else ""
        what = f"{verdict.capitalize()} with width" if verdict != "flat" else "Flat"
        print(f"{what}: {len(layers)} of {len(result.layers)} layers{named}.")
    from gradtrace.plots import plot_coord_check, save_figure

    title = f"Coordinate check of {label}: {steps}, lr {args.lr:g}"
    save_figure(plot_coord_check(result, title=title), args.output)
    print(f"\nFigure: {args.output}")
    if args.csv is not None:
        print(f"Records: {write_coord_check_csv(result, args.csv, label)}")
    return 0
