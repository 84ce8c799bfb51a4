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
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from gradtrace.cli.errors import CommandParser, UserError
from gradtrace.data import ChecksumError, DataNotFoundError
from gradtrace.measure.probe import (
    PROBE_STATS,
    ProbeResult,
    classification_loss,
    median_range,
    probe,
    random_batch,
)

__all__ = ["ProbedModel", "parse_model_spec", "probe_main", "probe_table", "write_probe_csv"]

DESCRIPTION = (
    "Measure each model's gradient flow on one batch over several seeds, at initialisation or "
    "after --steps optimizer steps, without training; print one row per model (input/output "
    "gradient ratio; slope in decades of mean |grad| per unit of depth, positive when it "
    "vanishes toward the input; first dead or saturated layer; loss) and draw them by depth."
)
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ProbedModel:
    """One row of the table: the model as given on the command line and what was measured."""

    label: str
    """``MODEL`` as given, e.g. ``coursework_vgg:depth=38,batch_norm=true``."""
    parameters: int
    result: ProbeResult


def parse_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name:key=value,key=value"`` as ``(name, {key: YAML value})``.

    Raises:
        ValueError: an option that is not ``key=value``, or a value that is not YAML.
    """
    name, _, options_text = spec.partition(":")
    options: dict[str, Any] = {}
    # commas inside a (non-nested) YAML list or mapping value stay with it: depth=[1, 2]
    for item in re.split(r",(?![^\[\]{}]*[\]}])", options_text) if options_text else []:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key.strip()):
            raise ValueError(
                f"model {spec!r}: options are key=value separated by commas, e.g. "
                f"coursework_vgg:depth=38,batch_norm=true; got {item!r}"
            )
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"model {spec!r}: {key}={value!r} is not a YAML value") from None
    return name, options


def _check_model(
    label: str, name: str, options: dict[str, Any], input_size: Sequence[int], classes: int
) -> int:
    """Build the model on the meta device and run one training-mode batch there: a bad
    option or an input it cannot take fails here, before any work, computing nothing.
    Returns the parameter count."""
    from gradtrace.models import create_model

    try:
        with torch.device("meta"):
            net = create_model(name, num_classes=classes, in_chans=input_size[0], **options)
            net.train()(torch.empty(2, *input_size))
    except ValueError as err:  # create_model's: unknown name, option or value
        raise UserError(f"{label}: {err}") from None
    except (RuntimeError, TypeError, AssertionError) as err:  # timm asserts its input size
        size = "x".join(map(str, input_size))
        built = f"build it with {options} or " if options else ""
        raise UserError(
            f"{label}: cannot {built}run it on {size} inputs ({type(err).__name__}: {err})"
        ) from None
    return sum(p.numel() for p in net.parameters())


def _dataset_batches(args: Any) -> tuple[Callable[[int], Batch], tuple[int, int, int], int]:
    """The dataset's batch function of the seed (the first batch of the whole official
    training set shuffled with that seed, as the data module shuffles it, without
    augmentation, normalised), its input size and class count. The data
    module's checks (dataset name, sizes, missing files: nothing is downloaded) run here,
    before anything is read; the data is read on the first batch."""
    from gradtrace.data.batches import TrainBatches
    from gradtrace.data.datamodule import ImageDataModule

    size = args.input_size
    data = ImageDataModule(
        dataset=args.data,
        root=str(args.data_root),
        batch_size=args.batch_size,
        val_size=0,  # the whole official training set: the probe needs no validation split
        augment="none",
        channels=size[0] if size else None,
        image_size=tuple(size[1:]) if size else None,
        num_classes=args.num_classes,
        synthetic_sizes=(max(args.batch_size, 1024), 16),
        # A probe is a quick look: a missing dataset is one line (raised here), not a download.
        download=False,
    )
    loaded: list[bool] = []

    def batch(seed: int) -> Batch:
        if not loaded:
            data.setup("fit")
            loaded.append(True)
        images, labels = data.split("train")
        batches = TrainBatches(images, labels, args.batch_size, seed=seed, augment="none")
        return data.transform_batch(next(iter(batches)))

    return batch, (data.num_channels, *data.image_size), data.num_classes


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
        "--input-size",
        type=int,
        nargs=3,
        metavar=("C", "H", "W"),
        help="input channels, height and width (default: each model's own, or the data's)",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        metavar="N",
        help="classifier outputs (default: each model's own, or the data's)",
    )
    parser.add_argument(
        "--aux-weight",
        type=float,
        default=0.3,
        metavar="W",
        help="weight of each auxiliary head's cross-entropy in the loss (GoogLeNet; default: 0.3)",
    )
    parser.add_argument(
        "--data",
        default="random",
        metavar="random|DATASET",
        help="random (standard normal images, uniform labels; a batch per seed) or a dataset "
        "(cifar10, cifar100, fashion_mnist, synthetic, imagefolder:<path>): the first batch of "
        "its training set shuffled with each seed, without augmentation (default: random)",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=Path("data"),
        metavar="DIR",
        help="folder of the dataset's files; nothing is downloaded (default: data)",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("probe.png"),
        metavar="FILE",
        help="the figure (default: probe.png)",
    )
    parser.add_argument(
        "--csv", type=Path, metavar="FILE", help="also write every record to this CSV file"
    )
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the models run (default: cuda when available, else cpu)",
    )
    return parser


def _check_arguments(parser: CommandParser, args: Any) -> None:
    positive = {"--seeds": args.seeds, "--batch-size": args.batch_size}
    positive["--num-classes"] = args.num_classes if args.num_classes is not None else 1
    for option, value in positive.items():
        if value < 1:
            parser.error(f"{option} must be >= 1; got {value}")
    if args.steps < 0:
        parser.error(f"--steps must be >= 0; got {args.steps}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0; got {args.lr}")
    if not args.aux_weight >= 0:
        parser.error(f"--aux-weight must be >= 0; got {args.aux_weight}")
    if args.input_size and min(args.input_size) < 1:
        parser.error(f"--input-size must be three integers >= 1; got {args.input_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available here: use --device cpu")
    if len(set(args.models)) < len(args.models):
        parser.error(f"a MODEL is given twice: {' '.join(args.models)}")


def probe_main(argv: Sequence[str]) -> int:
    """``gradtrace probe``: print the table, write the figure (and with ``--csv`` the
    records)."""
    from gradtrace.models import model_info

    parser = _parser()
    args = parser.parse_args(list(argv))
    _check_arguments(parser, args)
    try:
        import matplotlib  # noqa: F401  (optional: the "plot" extra)
    except ImportError:
        raise UserError(
            "gradtrace probe draws a figure, which needs matplotlib: pip install 'gradtrace[plot]'"
        ) from None
    device = torch.device(args.device)
    dataset = None
    specs = []
    try:
        if args.data != "random":
            dataset = _dataset_batches(args)
        for label in args.models:
            name, options = parse_model_spec(label)
            info = model_info(name)
            if dataset is not None:
                batch_fn, input_size, classes = dataset
            else:
                input_size = tuple(args.input_size or info.input_size)
                classes = args.num_classes or info.num_classes
                batch_fn = functools.partial(random_batch, input_size, classes, args.batch_size)
            parameters = _check_model(label, name, options, input_size, classes)
            build = _on_device(name, options, input_size[0], classes, device)
            specs.append((label, build, batch_fn, parameters))
        if dataset is not None:
            dataset[0](0)  # reads the data before any model runs
    except (ValueError, ChecksumError, DataNotFoundError) as err:
        # the data module's checks and reading, parse_model_spec, model_info
        message = str(err).replace("--data.root", "--data-root")
        if isinstance(err, DataNotFoundError):
            message += (
                f"; gradtrace probe never downloads (gradtrace fit --data.dataset {args.data} does)"
            )
        raise UserError(message) from None

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
