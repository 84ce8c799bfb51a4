"""The study's probes (:func:`gradtrace.measure.probe.probe`): each model's gradient profile at
initialisation (several seeds) and after training (the trained weights), the batch-norm depth
series, and the auxiliary-classifier control.

Every probe of one dataset measures on the same batch: the first training batch of the
study's data (seeded, no augmentation), so that the profiles at initialisation and after
training differ only in the weights.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradtrace.measure.probe import Batch, ProbeResult, classification_loss, probe
from gradtrace.studies.architectures.specs import ModelSpec

__all__ = [
    "AuxControl",
    "DepthPoint",
    "aux_control",
    "build_net",
    "data_batch",
    "depth_series",
    "init_profile",
    "trained_profile",
]

# The depth series: the coursework network with BN, without and with its residual connections
# (8 + 6b weight layers), and the CIFAR ResNets with and without shortcuts (6n + 2).
COURSEWORK_DEPTHS = (8, 14, 20, 26, 32, 38)
CIFAR_RESNET_DEPTHS = (20, 56, 110)
EARLY_FRACTION = 1 / 3  # "early layers": the first third of the main path


def build_net(model: Mapping[str, Any], num_classes: int, in_chans: int) -> nn.Module:
    """The network an ``ImageClassifier`` with settings ``model`` trains (built as training
    builds it)."""
    from gradtrace.classifier import ImageClassifier

    settings = {k: v for k, v in model.items() if k not in ("num_classes", "in_chans")}
    settings["channels_last"] = False
    return ImageClassifier(**settings, num_classes=num_classes, in_chans=in_chans).net


def data_batch(data: Any, device: torch.device) -> Batch:
    """The first training batch of the ``ImageDataModule`` ``data`` (built with augmentation
    off and the probes' batch size), on ``device`` and normalised as training sees it."""
    data.prepare_data()
    data.setup("fit")
    raw = next(iter(data.train_dataloader()))
    return data.transform_batch(tuple(t.to(device) for t in raw))


def _loss(model: Mapping[str, Any]) -> Any:
    weight = float(model.get("aux_weight", 0.3))
    return lambda output, targets: classification_loss(output, targets, aux_weight=weight)


def init_profile(
    spec: ModelSpec, batch: Batch, num_classes: int, in_chans: int, seeds: Sequence[int]
) -> ProbeResult:
    """``spec``'s profile at initialisation, one build per seed, on ``batch``."""
    device = batch[0].device
    return probe(
        lambda: build_net(spec.model, num_classes, in_chans).to(device),
        batch,
        seeds=seeds,
        loss_fn=_loss(spec.model),
    )


def trained_profile(spec: ModelSpec, net: nn.Module, batch: Batch) -> ProbeResult:
    """The trained network's profile on ``batch`` (a copy of ``net`` in training mode)."""
    return probe(net.to(batch[0].device), batch, loss_fn=_loss(spec.model))


@dataclass(frozen=True)
class DepthPoint:
    """One network of the depth series, probed at initialisation."""

    family: str
    """``"coursework VGG, BN"`` or ``"CIFAR ResNet"``."""
    depth: int
    residual: bool
    result: ProbeResult


def _init_probe(
    model: Mapping[str, Any], batch: Batch, num_classes: int, in_chans: int, seeds: Sequence[int]
) -> ProbeResult:
    device = batch[0].device
    return probe(
        lambda: build_net(model, num_classes, in_chans).to(device),
        batch,
        seeds=seeds,
        activations=False,
    )


def depth_series(
    batch: Batch, num_classes: int, in_chans: int, seeds: Sequence[int]
) -> list[DepthPoint]:
    """Input/output profiles at initialisation of batch-normalised networks of growing depth,
    with and without skip connections (the mean-field claim)."""
    points = []
    for residual in (False, True):
        for depth in COURSEWORK_DEPTHS:
            model = {
                "arch": "coursework_vgg",
                "depth": depth,
                "batch_norm": True,
                "residual": residual,
            }
            result = _init_probe(model, batch, num_classes, in_chans, seeds)
            points.append(DepthPoint("coursework VGG, BN", depth, residual, result))
        for depth in CIFAR_RESNET_DEPTHS:
            model = {"arch": f"{'resnet' if residual else 'plain'}{depth}"}
            result = _init_probe(model, batch, num_classes, in_chans, seeds)
            points.append(DepthPoint("CIFAR ResNet", depth, residual, result))
    return points


@dataclass(frozen=True)
class AuxControl:
    """GoogLeNet with its auxiliary heads, probed twice on the same weights: trained as it is
    (``with_aux``, heads weighted 0.3) and with the heads' loss weighted 0 (``without``)."""

    with_aux: ProbeResult
    without: ProbeResult

    def early_gains(self) -> list[float]:
        """Per seed: mean |grad| of the early layers (first third of the main path) with the
        auxiliary losses over without them."""
        early = max(1, int(len(self.with_aux.layers) * EARLY_FRACTION))
        gains = []
        for seed in self.with_aux.seeds:
            on = self.with_aux.per_seed()[seed][:early]
            off = self.without.per_seed()[seed][:early]
            gains.append(sum(on) / sum(off) if sum(off) else math.nan)
        return gains

    @property
    def early_gain(self) -> float:
        """Median of :meth:`early_gains`."""
        return statistics.median(self.early_gains())


def aux_control(
    spec: ModelSpec,
    batch: Batch,
    num_classes: int,
    in_chans: int,
    seeds: Sequence[int],
    with_aux: ProbeResult | None = None,
) -> AuxControl:
    """The auxiliary-classifier control for ``spec`` (a GoogLeNet with its heads); ``with_aux``
    reuses the model's own profile at initialisation on the same batch and seeds (the same
    weights and loss), so that only the probe without the heads' loss runs."""
    device = batch[0].device

    def build() -> nn.Module:
        return build_net(spec.model, num_classes, in_chans).to(device)

    if with_aux is None:
        with_aux = probe(build, batch, seeds=seeds, activations=False, loss_fn=_loss(spec.model))
    without = probe(
        build,
        batch,
        seeds=seeds,
        activations=False,
        loss_fn=lambda output, targets: classification_loss(output, targets, aux_weight=0.0),
    )
    return AuxControl(with_aux, without)
