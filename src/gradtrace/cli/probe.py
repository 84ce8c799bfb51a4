"""Models' gradient flow on one batch, side by side, without training: ``gradtrace probe``.

``gradtrace probe vgg38 coursework_vgg:depth=38,batch_norm=true`` builds each model once per
seed (seeds 0..N-1, :func:`gradtrace.models.create_model`), runs
:func:`gradtrace.measure.probe.probe` on a batch (random images by default, or the first
training batch of a dataset), prints one row per model (:func:`probe_table`) and draws them
overlaid by relative depth (:func:`gradtrace.plots.plot_probe`).
"""

from __future__ import annotations

import csv
import functools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
from gradtrace.measure.probe import (
    PROBE_STATS,
    ProbeResult,
    classification_loss,
    median_range,
    probe,
)

__all__ = ["ProbedModel", "probe_main", "probe_table", "write_probe_csv"]

DESCRIPTION = (
    "Measure each model's gradient flow on one batch over several seeds, at initialisation or "
    "after --steps optimizer steps, without training; print one row per model (input/output "
    "gradient ratio; slope in decades of mean |grad| per unit of depth, positive when it "
    "vanishes toward the input; first dead or saturated layer; loss) and draw them by depth."
)


@dataclass(frozen=True)
class ProbedModel:
    """One row of the table: the model as given on the command line and what was measured."""

    label: str
    """``MODEL`` as given, e.g. ``coursework_vgg:depth=38,batch_norm=true``."""
    parameters: int
    result: ProbeResult


def _on_device(
    name: str, options: dict[str, Any], channels: int, classes: int, device: torch.device
) -> Callable[[], torch.nn.Module]:
    """The model builder :func:`~gradtrace.measure.probe.probe` calls once per seed."""
    from gradtrace.models import create_model

    return lambda: create_model(name, num_classes=classes, in_chans=channels, **options).to(device)


PROBE_COLUMNS = (
    "model",
    "parameters",
    "layers",
    "input/output ratio",
    "slope",
    "first dead/saturated layer",
    "loss",
)
"""The table's columns (:func:`probe_table`)."""


def _cells(row: ProbedModel) -> list[str]:
    result = row.result
    off = len(result.off_path)
    layers = f"{len(result.layers)} (+{off} off path)" if off else str(len(result.layers))
    return [
        row.label,
        f"{row.parameters:,}",
        layers,
        median_range(result.ratios, ".1e"),
        median_range(result.slopes, ".2f"),
        result.first_problem() or "none",
        f"{statistics.median(result.losses):.3f}",
    ]


def probe_table(rows: Sequence[ProbedModel], *, markdown: bool = False) -> str:
    """One row per model: label, parameters, main-path layers (and how many are off it), the
    input/output ratio and the slope as ``median [min, max]`` over the seeds, the first dead or
    saturated layer (``none``) and the median loss; plain aligned text or markdown."""
    cells = [_cells(row) for row in rows]
    if markdown:
        lines = ["| " + " | ".join(PROBE_COLUMNS) + " |", "|---|---:|---:|---:|---:|---|---:|"]
        return "\n".join([*lines, *("| " + " | ".join(c) + " |" for c in cells)])
    widths = [max(len(c[i]) for c in [list(PROBE_COLUMNS), *cells]) for i in range(7)]
    left = {0, 5}  # text columns; numbers are right-aligned

    def line(values: Sequence[str]) -> str:
        padded = [
            v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))
        ]
        return "  ".join(padded).rstrip()

    return "\n".join(line(c) for c in [list(PROBE_COLUMNS), *cells])


def write_probe_csv(rows: Sequence[ProbedModel], path: str | Path) -> Path:
    """Every probe record (one per model, seed and main-path layer) with a ``model`` column."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["model", "seed", "step", "layer", "depth", *PROBE_STATS]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            for record in row.result.records:
                writer.writerow({"model": row.label, **{k: record[k] for k in fields[1:]}})
    return path


def _parser() -> CommandParser:
    from gradtrace.models import list_models

    parser = CommandParser(prog="gradtrace probe", description=DESCRIPTION)
    parser.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="a model name, optionally with options as YAML values: NAME[:KEY=VALUE,...], e.g. "
        f"coursework_vgg:depth=38,batch_norm=true; names: {', '.join(list_models())}",
    )
    parser.add_argument(
        "--seeds", type=int, default=3, metavar="N", help="seeds 0..N-1 (default: 3)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, metavar="N", help="images (default: 64)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=0,
        metavar="K",
        help="optimizer steps on the batch before measuring (default: 0, the model as built)",
    )
    parser.add_argument(
        "--optimizer", choices=("adam", "sgd"), default="adam", help="for --steps (default: adam)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="for --steps (default: 1e-3)")
    parser.add_argument(
        "--aux-weight",
        type=float,
        default=0.3,
        metavar="W",
        help="weight of each auxiliary head's cross-entropy in the loss (GoogLeNet; default: 0.3)",
    )
    add_input_options(parser, figure="probe.png", models="each model")
    return parser


def _check_arguments(parser: CommandParser, args: Any) -> None:
    check_input_options(parser, args)
    if args.steps < 0:
        parser.error(f"--steps must be >= 0; got {args.steps}")
    if not args.aux_weight >= 0:
        parser.error(f"--aux-weight must be >= 0; got {args.aux_weight}")
    if len(set(args.models)) < len(args.models):
        parser.error(f"a MODEL is given twice: {' '.join(args.models)}")


def probe_main(argv: Sequence[str]) -> int:
    """``gradtrace probe``: print the table, write the figure (and with ``--csv`` the
    records)."""
    from gradtrace.models import model_info

    parser = _parser()
    args = parser.parse_args(list(argv))
    _check_arguments(parser, args)
    require_matplotlib("probe")
    device = torch.device(args.device)
    dataset = None
    specs = []
    try:
        if args.data != "random":
            dataset = dataset_batches(args)
        for label in args.models:
            name, options = parse_model_spec(label)
            info = model_info(name)
            if dataset is not None:
                batch_fn, input_size, classes = dataset
            else:
                random = random_batches(args, info.input_size, info.num_classes)
                batch_fn, input_size, classes = random
            parameters = check_model_on_meta(label, name, options, input_size, classes)
            build = _on_device(name, options, input_size[0], classes, device)
            specs.append((label, build, batch_fn, parameters))
        if dataset is not None:
            dataset[0](0)  # reads the data before any model runs
    except (ValueError, ChecksumError, DataNotFoundError) as err:
        # the data module's checks and reading, parse_model_spec, model_info
        raise input_error(err, "probe", args.data) from None

    loss_fn = functools.partial(classification_loss, aux_weight=args.aux_weight)
    optimizer = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[args.optimizer]
    rows = []
    for label, build, batch_fn, parameters in specs:
        try:
            result = probe(
                build,
                lambda seed, batch_fn=batch_fn: tuple(t.to(device) for t in batch_fn(seed)),
                seeds=range(args.seeds),
                steps=args.steps,
                optimizer=lambda params: optimizer(params, lr=args.lr),
                loss_fn=loss_fn,
            )
        except ValueError as err:  # fewer than two layers on the main path
            raise UserError(f"{label}: {err}") from None
        rows.append(ProbedModel(label, parameters, result))

    when = f"after {args.steps} {args.optimizer} steps" if args.steps else "at initialisation"
    seeds = f"{args.seeds} seed{'s' if args.seeds > 1 else ''}"
    data = "random images" if dataset is None else f"{args.data} (first training batch)"
    print(f"Gradient flow {when}: {seeds}, batch {args.batch_size} of {data}, on {args.device}.")
    print(probe_table(rows, markdown=args.markdown))
    from gradtrace.plots import plot_probe, save_figure

    title = f"Gradient flow {when} ({seeds}, batch {args.batch_size})"
    save_figure(plot_probe({row.label: row.result for row in rows}, title=title), args.output)
    print(f"\nFigure: {args.output}")
    if args.csv is not None:
        print(f"Records: {write_probe_csv(rows, args.csv)}")
    return 0
