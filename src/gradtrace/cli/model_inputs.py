"""What ``gradtrace probe`` and ``gradtrace coord-check`` share: a model given on the command
line (``NAME[:KEY=VALUE,...]``), checked on the meta device before any work, a dataset's first
training batch to measure it on, read without downloading, and the options that say so.
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from gradtrace.cli.errors import UserError
from gradtrace.data import DataNotFoundError
from gradtrace.measure.probe import Batch, random_batch

__all__ = [
    "add_input_options",
    "check_input_options",
    "check_model_on_meta",
    "dataset_batches",
    "input_error",
    "parse_model_spec",
    "random_batches",
]


def add_input_options(parser: argparse.ArgumentParser, *, figure: str, models: str) -> None:
    """The options of the inputs, the outputs and the device: ``--input-size``,
    ``--num-classes``, ``--data``, ``--data-root``, ``-o``/``--output`` (default ``figure``),
    ``--csv``, ``--markdown``, ``--device``; ``models`` names what they apply to in the help
    ("the model", "each model")."""
    parser.add_argument(
        "--input-size",
        type=int,
        nargs=3,
        metavar=("C", "H", "W"),
        help=f"input channels, height and width (default: {models}'s own, or the data's)",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        metavar="N",
        help=f"classifier outputs (default: {models}'s own, or the data's)",
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
        default=Path(figure),
        metavar="FILE",
        help=f"the figure (default: {figure})",
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


def check_input_options(parser: argparse.ArgumentParser, args: Any) -> None:
    """:func:`add_input_options`' values, and ``--seeds``, ``--batch-size``, ``--lr``: one
    ``parser.error`` line (exit status 2) for the first bad one."""
    positive = {"--seeds": args.seeds, "--batch-size": args.batch_size}
    positive["--num-classes"] = args.num_classes if args.num_classes is not None else 1
    for option, value in positive.items():
        if value < 1:
            parser.error(f"{option} must be >= 1; got {value}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0; got {args.lr}")
    if args.input_size and min(args.input_size) < 1:
        parser.error(f"--input-size must be three integers >= 1; got {args.input_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available here: use --device cpu")


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


def check_model_on_meta(
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


def dataset_batches(args: Any) -> tuple[Callable[[int], Batch], tuple[int, int, int], int]:
    """The dataset's batch function of the seed (the first batch of the whole official
    training set shuffled with that seed, as the data module shuffles it, without
    augmentation, normalised), its input size and class count. The data
    module's checks (dataset name, sizes, missing files: nothing is downloaded) run here,
    before anything is read; the data is read on the first batch. ``args``: the command's
    options ``data``, ``data_root``, ``batch_size``, ``input_size`` and ``num_classes``."""
    from gradtrace.data.batches import TrainBatches
    from gradtrace.data.datamodule import ImageDataModule

    size = args.input_size
    data = ImageDataModule(
        dataset=args.data,
        root=str(args.data_root),
        batch_size=args.batch_size,
        val_size=0,  # the whole official training set: a measurement needs no validation split
        augment="none",
        channels=size[0] if size else None,
        image_size=tuple(size[1:]) if size else None,
        num_classes=args.num_classes,
        synthetic_sizes=(max(args.batch_size, 1024), 16),
        # A quick look: a missing dataset is one line (raised here), not a download.
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


def input_error(err: Exception, command: str, dataset: str) -> UserError:
    """The one-line :class:`UserError` for a bad model spec or name (``ValueError``) or a
    dataset that is missing or corrupted, read by ``gradtrace COMMAND --data DATASET``."""
    message = str(err).replace("--data.root", "--data-root")
    if isinstance(err, DataNotFoundError):
        message += (
            f"; gradtrace {command} never downloads (gradtrace fit --data.dataset {dataset} does)"
        )
    return UserError(message)


def random_batches(
    args: Any, input_size: Sequence[int], num_classes: int
) -> tuple[Callable[[int], Batch], tuple[int, ...], int]:
    """For ``--data random``: a batch of ``--batch-size`` random images per seed, of
    ``--input-size`` and ``--num-classes`` when given, else the model's own ``input_size``
    and ``num_classes``; as ``(batch of the seed, input size, classes)`` like
    :func:`dataset_batches`."""
    size = tuple(args.input_size or input_size)
    classes = args.num_classes or num_classes
    return functools.partial(random_batch, size, classes, args.batch_size), size, classes
