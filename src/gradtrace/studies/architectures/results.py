"""What the study measured, per model and dataset: cost, accuracy and gradient profiles.

Two sources: the smoke budget's in-process short runs (:func:`smoke_study`), and finished CLI
runs of the sweep (:func:`collect_study`, the full budget's runs or any folder holding them).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradtrace.measure.probe import ProbeResult
from gradtrace.studies.architectures.probes import (
    AuxControl,
    DepthPoint,
    aux_control,
    build_net,
    data_batch,
    depth_series,
    init_profile,
    trained_profile,
)
from gradtrace.studies.architectures.specs import ModelSpec

__all__ = ["SMOKE_LEFT_OUT", "ModelResult", "Study", "collect_study", "cost", "smoke_study"]

log = logging.getLogger(__name__)

# Trained at the full budget only: the 110-layer twins (a CPU minute each at the smoke budget)
# and GoogLeNet without BN (a CPU minute and a half each, on top of the two with BN). The depth
# series probes the former and the auxiliary control the latter at initialisation at every
# budget.
SMOKE_LEFT_OUT = ("resnet110", "plain110", "googlenet-aux-nobn", "googlenet-noaux-nobn")
EVAL_BATCH = 100  # validation only: larger batches cost less per image on a CPU
FINAL_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc")


@dataclass
class ModelResult:
    """One model trained on one dataset."""

    spec: ModelSpec
    dataset: str
    num_classes: int
    input_size: tuple[int, int, int]
    params: int
    macs: int
    """Multiply-accumulates of one image's forward pass in eval mode."""
    metrics: dict[str, float]
    """Final ``train/loss``, ``train/acc`` (last epoch), ``val/loss``, ``val/acc``."""
    steps: int
    epochs: int
    init: ProbeResult = field(repr=False)
    end: ProbeResult | None = field(repr=False)
    """The trained network's profile; ``None`` when the run left no checkpoint."""
    source: Path | None = None
    seconds: float | None = None


@dataclass
class Study:
    """Everything the report and the claims read."""

    budget: str
    data: str
    """One line describing the data, for the report."""
    results: list[ModelResult]
    depth: list[DepthPoint]
    aux: dict[str, AuxControl]
    """The auxiliary-classifier control of each GoogLeNet with heads, by its label."""
    seeds: tuple[int, ...]
    probe_batch: int

    def datasets(self) -> list[str]:
        return list(dict.fromkeys(r.dataset for r in self.results))


def cost(spec: ModelSpec, num_classes: int, input_size: tuple[int, int, int]) -> tuple[int, int]:
    """(parameters, auxiliary heads' included; MACs of one image's forward pass in eval mode,
    the heads' not: they do not run at inference) of ``spec``'s network."""
    from gradtrace.models.summary import summarize

    net = build_net(spec.model, num_classes, input_size[0]).eval()
    return sum(p.numel() for p in net.parameters()), summarize(net, input_size).total_macs


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _aux(
    specs: Sequence[ModelSpec],
    results: Sequence[ModelResult],
    batch: Any,
    num_classes: int,
    in_chans: int,
    seeds: Sequence[int],
) -> dict[str, AuxControl]:
    """The auxiliary-classifier control of every GoogLeNet with heads among ``specs``, by
    label (reusing a model's profile at initialisation from ``results`` when it trained)."""
    controls = {}
    for spec in specs:
        if spec.arch != "googlenet" or not spec.arch_kwargs.get("aux_logits", True):
            continue
        log.info("probing %s without its auxiliary losses (the control)", spec.label)
        measured = next((r.init for r in results if r.spec.key == spec.key), None)
        controls[spec.label] = aux_control(
            spec, batch, num_classes, in_chans, seeds, with_aux=measured
        )
    return controls


def smoke_study(
    specs: Sequence[ModelSpec],
    root: Path,
    steps: int,
    batch_size: int,
    probe_batch: int,
    seeds: Sequence[int],
    val_size: int = 500,
    synthetic: bool = False,
) -> Study:
    """Train every model of ``specs`` (but :data:`SMOKE_LEFT_OUT`) ``steps`` steps on
    Fashion-MNIST (two epochs of a class-balanced subset; synthetic data only when asked for),
    in process under ``root``, and probe each at initialisation and after training."""
    from gradtrace.studies.short_run import RunSpec, short_run, smoke_data

    subset = max(batch_size, steps * batch_size // 2)
    data, description = smoke_data(
        batch_size=batch_size,
        val_size=val_size,
        subset=subset,
        synthetic=synthetic,
        eval_batch_size=EVAL_BATCH,
    )
    probe_data, _ = smoke_data(
        batch_size=probe_batch,
        val_size=val_size,
        subset=max(subset, probe_batch),
        synthetic=synthetic,
    )
    device = _device()
    batch = data_batch(probe_data, device)
    classes, channels = data.num_classes, data.num_channels
    input_size = (channels, *data.image_size)
    log.info("probing the batch-norm depth series at initialisation")
    depth = depth_series(batch, classes, channels, seeds)
    results = []
    for spec in specs:
        if spec.key in SMOKE_LEFT_OUT:
            continue
        start = time.perf_counter()
        init = init_profile(spec, batch, classes, channels, seeds)
        run = short_run(
            RunSpec(spec.key, spec.label, spec.model),
            data,
            max_steps=steps,
            root=root,
            every_n_steps=10,
            enable_progress_bar=False,
            check_val_every_n_epoch=steps,  # validate once, after training
        )
        end = trained_profile(spec, run.model.net, batch)
        params, macs = cost(spec, classes, input_size)
        seconds = time.perf_counter() - start
        metrics = {k: v for k, v in run.metrics.items() if k in FINAL_METRICS}
        results.append(
            ModelResult(
                spec,
                "synthetic" if synthetic else "fashion_mnist",
                classes,
                input_size,
                params,
                macs,
                metrics,
                run.steps,
                _epochs(run.log_dir),
                init,
                end,
                run.log_dir,
                seconds,
            )
        )
        log.info(
            "%s: val acc %.1f%% in %.0f s",
            spec.label,
            100 * metrics.get("val/acc", math.nan),
            seconds,
        )
    aux = _aux(specs, results, batch, classes, channels, seeds)
    description += (
        f"; {subset:,} training images (class-balanced subset, two epochs), "
        f"{val_size:,} validation images"
    )
    return Study("smoke", description, results, depth, aux, tuple(seeds), probe_batch)


def _epochs(run_dir: Path) -> int:
    from gradtrace.cli.run_files import read_run
    from gradtrace.studies.table1.rows import measured

    return measured(read_run(run_dir))[3]


def _described(data: dict[str, Any]) -> str:
    """One run's data settings in words (every run of a dataset shares them)."""
    from gradtrace.data.augmentation import resolve_augment
    from gradtrace.data.image_data import parse_dataset
    from gradtrace.data.options import default_augment

    kind, _ = parse_dataset(str(data.get("dataset")))
    augment = resolve_augment(data.get("augment"), default_augment(kind))
    return (
        f"{data.get('dataset')}: batch {data.get('batch_size')}, {data.get('val_size')} "
        f"validation images, training augmentation {augment}, normalisation "
        f"{data.get('normalization', 'split')}"
    )


def _probe_data(config: dict[str, Any], probe_batch: int) -> Any:
    """The run's data module, rebuilt from its ``config.yaml`` without augmentation at the
    probes' batch size."""
    from gradtrace.data.datamodule import ImageDataModule

    settings = dict(config.get("data") or {})
    settings.update(batch_size=probe_batch, augment="none", device_resident=False)
    return ImageDataModule(**settings)


def _trained_net(run_dir: Path, device: torch.device) -> torch.nn.Module | None:
    from gradtrace.classifier import ImageClassifier
    from gradtrace.cli.trainer_cli import last_checkpoint

    checkpoint = last_checkpoint(run_dir)
    if checkpoint is None:
        return None
    return ImageClassifier.load_from_checkpoint(checkpoint, map_location=device).net


def collect_study(
    folder: Path,
    specs: Sequence[ModelSpec],
    datasets: Sequence[str],
    probe_batch: int,
    seeds: Sequence[int],
) -> Study:
    """The study from the finished CLI runs under ``folder`` (any depth): for each model and
    dataset the run with the most steps; its final metrics, and the profile of its
    ``last.ckpt``.

    Raises:
        ValueError: ``folder`` is missing, or no run matches some model (listed).
    """
    from gradtrace.cli.run_files import RunFilesError, read_run
    from gradtrace.studies.table1.rows import measured

    if not folder.is_dir():
        raise ValueError(f"--from {folder}: no such folder")
    runs = []
    for config_file in sorted(folder.rglob("config.yaml")):
        try:
            runs.append(read_run(config_file.parent))
        except RunFilesError:
            continue  # a run that never started
    found: dict[str, dict[str, Any]] = {dataset: {} for dataset in datasets}
    missing = []
    for dataset in datasets:
        for spec in specs:
            matching = [
                run
                for run in runs
                if spec.matches(run.config.get("model") or {})
                and (run.config.get("data") or {}).get("dataset") == dataset
            ]
            if matching:
                found[dataset][spec.key] = max(matching, key=lambda run: measured(run)[2])
            else:
                missing.append(f"{spec.key} on {dataset}")
    if missing:
        raise ValueError(
            f"no finished run under {folder} for {', '.join(missing)}; run them with "
            "`make reproduce-architectures` or `make sweep-local SWEEP=sweeps/architectures.yaml`"
        )
    device = _device()
    results: list[ModelResult] = []
    depth: list[DepthPoint] = []
    aux: dict[str, AuxControl] = {}
    described = []
    for dataset in datasets:
        config = next(iter(found[dataset].values())).config
        described.append(_described(config.get("data") or {}))
        data = _probe_data(config, probe_batch)
        batch = data_batch(data, device)
        classes, channels = data.num_classes, data.num_channels
        input_size = (channels, *data.image_size)
        if not depth:
            depth = depth_series(batch, classes, channels, seeds)
        for spec in specs:
            run = found[dataset][spec.key]
            final, _, steps, epochs = measured(run)
            net = _trained_net(run.path, device)
            params, macs = cost(spec, classes, input_size)
            results.append(
                ModelResult(
                    spec,
                    dataset,
                    classes,
                    input_size,
                    params,
                    macs,
                    {k: v for k, v in final.items() if k in FINAL_METRICS},
                    steps,
                    epochs,
                    init_profile(spec, batch, classes, channels, seeds),
                    trained_profile(spec, net, batch) if net is not None else None,
                    run.path,
                )
            )
        if not aux:
            here = [r for r in results if r.dataset == dataset]
            aux = _aux(specs, here, batch, classes, channels, seeds)
    return Study("full", "; ".join(described), results, depth, aux, tuple(seeds), probe_batch)
