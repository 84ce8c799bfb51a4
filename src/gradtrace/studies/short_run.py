"""The study's runs: the Table 1 rows (from the shipped configs) and short in-process training.

``make demo``, the smoke budget of ``make reproduce-table1`` and the slow real-data test all
train a few Table 1 rows for a few hundred steps on Fashion-MNIST (found locally or downloaded;
synthetic only when asked for); this module is that one piece of code.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml

from gradtrace.classifier import ImageClassifier
from gradtrace.cli.configs import CONFIG_DIR
from gradtrace.cli.run_identity import RunCSVLogger
from gradtrace.console import StepProgress, quiet_output
from gradtrace.data import locate_fashion_mnist
from gradtrace.data.datamodule import ImageDataModule
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
    """One row of the study: a name, a label for tables, the model's settings and the
    ``GradientFlow(include=...)`` patterns of the layers its figures show."""

    name: str
    label: str
    model: dict[str, Any]
    layers: tuple[str, ...] = ()

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
    model: ImageClassifier | None = field(repr=False, default=None)
    """The trained model (kept for probing it after training)."""


def _label(model: dict[str, Any]) -> str:
    parts = [f"VGG{model['depth']:02d}"]
    fixes = [name for key, name in (("batch_norm", "BN"), ("residual", "RC")) if model.get(key)]
    return " ".join(parts + ([" + ".join(fixes)] if fixes else []))


def _figure_layers(config: dict[str, Any]) -> tuple[str, ...]:
    """The ``include`` of the config's GradientFlow callback (what its figures show)."""
    for callback in config.get("trainer", {}).get("callbacks") or []:
        if callback.get("class_path") == "gradtrace.GradientFlow":
            return tuple(callback.get("init_args", {}).get("include", ()))
    return ()


def table1_specs(names: tuple[str, ...] = TABLE1_ORDER) -> list[RunSpec]:
    """The Table 1 rows, read from the shipped ``configs/table1/<name>.yaml``."""
    specs = []
    for name in names:
        path = CONFIG_DIR / "table1" / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(f"no Table 1 row {name!r}; rows: {', '.join(TABLE1_ORDER)}")
        config = yaml.safe_load(path.read_text())
        model = config["model"]
        specs.append(
            RunSpec(name=name, label=_label(model), model=model, layers=_figure_layers(config))
        )
    return specs


def smoke_data(
    batch_size: int = 32,
    val_size: int = 1000,
    subset: int | None = None,
    augment: str = "none",
    seed: int = 0,
    root: str | Path = "data",
    synthetic: bool = False,
    eval_batch_size: int | None = None,
) -> tuple[ImageDataModule, str]:
    """Fashion-MNIST found locally or downloaded, or synthetic data when ``synthetic`` is set.

    Fashion-MNIST is looked for under ``root`` and in Debian's package, then downloaded into
    ``root`` with its published checksums (:func:`~gradtrace.data.locate_fashion_mnist`,
    which logs where it came from); when all of that fails,
    :class:`~gradtrace.data.DataNotFoundError` lists the ways to provide it. Synthetic
    data is never a silent fallback. ``eval_batch_size`` (default: ``batch_size``) batches
    validation and test. Augmentation is off by default: a few hundred steps are
    too few for crop + flip to pay off, and they slow the short runs' learning. Returns the
    data module and a one-line description of the data for reports.
    """
    common = dict(
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        val_size=val_size,
        subset=subset,
        augment=augment,
        seed=seed,
    )
    if synthetic:
        log.warning("Synthetic data (asked for): the numbers below say nothing about real data.")
        data = ImageDataModule(
            dataset="synthetic",
            num_classes=10,
            channels=1,
            synthetic_sizes=(12_000, 2_000),
            **common,
        )
        return data, f"SYNTHETIC data (asked for): 10 classes, 1x32x32, batch {batch_size}"
    directory, how = locate_fashion_mnist(root)
    log.info("%s", how)
    data = ImageDataModule(dataset="fashion_mnist", root=str(directory), download=False, **common)
    return data, (
        f"Fashion-MNIST (real data, 28x28 grey zero-padded to 32x32, 10 classes, batch "
        f"{batch_size}, augmentation {data.augment})"
    )


def short_run(
    spec: RunSpec,
    data: ImageDataModule,
    max_steps: int,
    root: str | Path,
    every_n_steps: int = 10,
    seed: int = 0,
    progress: bool = True,
    **trainer_kwargs: Any,
) -> RunResult:
    """Train ``spec`` for ``max_steps`` steps, validate once, and collect what was measured.

    Logs (CSV metrics, ``gradient_flow.csv``, gradient-flow plots) go to
    ``<root>/<spec.name>/``, replacing an earlier short run of the same name (short runs are
    never resumed); the layers are ``spec.layers`` (as in the row's shipped config). The
    gradient ratio is input/output ``mean_abs`` averaged over the last five logged steps.
    Runs inside :func:`~gradtrace.console.quiet_output`
    with one :class:`~gradtrace.console.StepProgress` line (unless ``progress`` is false)
    instead of Lightning's progress bar. One device unless ``trainer_kwargs`` say otherwise.
    """
    pl.seed_everything(seed, workers=True, verbose=False)
    model = ImageClassifier(
        **{k: v for k, v in spec.model.items() if k not in ("num_classes", "in_chans")},
        num_classes=data.num_classes,
        in_chans=data.num_channels,
    )
    run_dir = Path(root) / spec.name
    shutil.rmtree(run_dir, ignore_errors=True)
    flow = GradientFlow(every_n_steps=every_n_steps, include=spec.layers)
    callbacks: list[pl.Callback] = [flow]
    if progress:
        callbacks.append(StepProgress(spec.label))
    trainer_kwargs.setdefault("enable_progress_bar", False)
    # One device: Lightning's "auto" would relaunch this in-process run once per visible GPU.
    trainer_kwargs.setdefault("devices", 1)
    with quiet_output():
        trainer = pl.Trainer(
            max_steps=max_steps,
            logger=RunCSVLogger(root, spec.name),
            callbacks=callbacks,
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
        model=model,
    )
