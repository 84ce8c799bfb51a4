"""The study's runs: the Table 1 rows (from the shipped configs) and short in-process training.

``make demo``, the smoke budget of ``make reproduce-table1`` and the slow real-data test all
train a few Table 1 rows for a few hundred steps on Fashion-MNIST (synthetic when Debian's
package is missing); this module is that one piece of code.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.loggers import CSVLogger

from gradtrace.classifier import ImageClassifier
from gradtrace.cli import CONFIG_DIR
from gradtrace.datamodule import ImageDataModule
from gradtrace.datasets import find_fashion_mnist
from gradtrace.gradient_flow import GradientFlow

__all__ = ["RunResult", "RunSpec", "short_run", "smoke_data", "table1_specs"]

log = logging.getLogger(__name__)

TABLE1_ORDER = (
    "vgg08",
    "vgg38",
    "vgg38-bn",
    "vgg38-rc",
    "vgg38-bn-rc",
    "vgg38-bn-lr1e-2",
    "vgg38-bn-rc-lr1e-2",
)


@dataclass(frozen=True)
class RunSpec:
    """One row of the study: a name, a label for tables, and the model's settings."""

    name: str
    label: str
    model: dict[str, Any]

    @property
    def lr(self) -> float:
        return float(self.model["lr"])


@dataclass
class RunResult:
    """What a short run measured. ``metrics`` holds ``train/loss``, ``val/acc``, ..."""

    spec: RunSpec
    params: int
    num_classes: int
    steps: int
    metrics: dict[str, float]
    grad_ratio: float
    log_dir: Path
    history: list[dict[str, Any]] = field(repr=False, default_factory=list)


def _label(model: dict[str, Any]) -> str:
    parts = [f"VGG{model['depth']:02d}"]
    fixes = [name for key, name in (("batch_norm", "BN"), ("residual", "RC")) if model.get(key)]
    return " ".join(parts + ([" + ".join(fixes)] if fixes else []))


def table1_specs(names: tuple[str, ...] = TABLE1_ORDER) -> list[RunSpec]:
    """The Table 1 rows, read from the shipped ``configs/table1/<name>.yaml``."""
    specs = []
    for name in names:
        path = CONFIG_DIR / "table1" / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(f"no Table 1 row {name!r}; rows: {', '.join(TABLE1_ORDER)}")
        model = yaml.safe_load(path.read_text())["model"]
        specs.append(RunSpec(name=name, label=_label(model), model=model))
    return specs


def smoke_data(
    batch_size: int = 32,
    val_size: int = 1000,
    subset: int | None = None,
    augment: bool = False,
    seed: int = 0,
) -> tuple[ImageDataModule, str]:
    """Fashion-MNIST from Debian's package, or, loudly, synthetic data when it is missing.

    Augmentation is off by default: a few hundred steps are too few for crop + flip to pay
    off, and they slow the short runs' learning. Returns the data module and a one-line
    description of the data for reports.
    """
    common = dict(
        batch_size=batch_size, val_size=val_size, subset=subset, augment=augment, seed=seed
    )
    if find_fashion_mnist("data") is not None:
        return (
            ImageDataModule(dataset="fashion_mnist", root="data", download=False, **common),
            "Fashion-MNIST (real data, 28x28 grey zero-padded to 32x32, 10 classes, "
            f"batch {batch_size}, {'with' if augment else 'no'} augmentation)",
        )
    banner = "!" * 78
    log.warning(
        "\n%s\n!! Fashion-MNIST not found (apt-get install dataset-fashion-mnist).\n"
        "!! FALLING BACK TO SYNTHETIC DATA: the numbers below are not real-data results.\n%s",
        banner,
        banner,
    )
    data = ImageDataModule(
        dataset="synthetic", num_classes=10, channels=1, synthetic_sizes=(12_000, 2_000), **common
    )
    return data, f"SYNTHETIC data (Fashion-MNIST missing): 10 classes, 1x32x32, batch {batch_size}"


def short_run(
    spec: RunSpec,
    data: ImageDataModule,
    max_steps: int,
    root: str | Path,
    every_n_steps: int = 10,
    seed: int = 0,
    **trainer_kwargs: Any,
) -> RunResult:
    """Train ``spec`` for ``max_steps`` steps, validate once, and collect what was measured.

    Logs (CSV metrics, ``gradient_flow.csv``, gradient-flow plots) go to
    ``<root>/<spec.name>/version_N``. The gradient ratio is input/output ``mean_abs``
    averaged over the last five logged steps.
    """
    pl.seed_everything(seed, workers=True, verbose=False)
    model = ImageClassifier(
        **{k: v for k, v in spec.model.items() if k not in ("num_classes", "in_chans")},
        num_classes=data.num_classes,
        in_chans=data.num_channels,
    )
    flow = GradientFlow(every_n_steps=every_n_steps)
    trainer = pl.Trainer(
        max_steps=max_steps,
        logger=CSVLogger(root, name=spec.name),
        callbacks=[flow],
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=every_n_steps,
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=data)
    train_metrics = {
        k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("train/")
    }
    val_metrics = trainer.validate(model, datamodule=data, verbose=False)[0]
    ratio = flow.input_output_ratio(last_n=5)
    return RunResult(
        spec=spec,
        params=sum(p.numel() for p in model.net.parameters()),
        num_classes=data.num_classes,
        steps=trainer.global_step,
        metrics={**train_metrics, **{k: float(v) for k, v in val_metrics.items()}},
        grad_ratio=ratio if math.isfinite(ratio) else math.inf,
        log_dir=Path(trainer.log_dir),
        history=list(flow.history),
    )
