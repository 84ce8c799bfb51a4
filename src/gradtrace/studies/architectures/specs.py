"""The compared models, read from the sweep file (``sweeps/architectures.yaml``) so that the
study and ``make sweep SWEEP=sweeps/architectures.yaml`` train the same runs.

Each ``model`` value of the sweep is a mapping of ``--model.*`` settings, merged over the
sweep command's own ``--model.*`` arguments (the shared optimiser and schedule).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gradtrace.sweeps.grid import load_sweep

__all__ = ["SWEEP_FILE", "ModelSpec", "model_specs"]

SWEEP_FILE = Path("sweeps/architectures.yaml")

# Display order and names of the families (by ``arch``).
FAMILIES = {
    "coursework_vgg": "VGG38 (coursework)",
    "resnet": "ResNet / plain (CIFAR)",
    "plain": "ResNet / plain (CIFAR)",
    "googlenet": "GoogLeNet",
    "vit": "Transformers",
    "swin": "Transformers",
    "vgg_cifar10": "VGG (seed paper)",
}


@dataclass(frozen=True)
class ModelSpec:
    """One compared model: a short ``key`` (file names), a ``label`` (tables, legends), its
    ``family`` and the ``ImageClassifier`` settings it trains with (``model``)."""

    key: str
    label: str
    family: str
    model: dict[str, Any]

    @property
    def arch(self) -> str:
        return str(self.model["arch"])

    @property
    def arch_kwargs(self) -> dict[str, Any]:
        return dict(self.model.get("arch_kwargs") or {})

    def matches(self, settings: Mapping[str, Any]) -> bool:
        """Whether a run's resolved ``model`` settings (its ``config.yaml``) train this model:
        equal once both are filled with ``ImageClassifier``'s defaults (a run with another
        initialisation, weight decay or architecture option is another experiment)."""
        from gradtrace.studies.table1.rows import model_defaults, resolved_model_settings

        defaults = model_defaults()
        return resolved_model_settings(settings, defaults) == resolved_model_settings(
            self.model, defaults
        )


def _family(arch: str) -> str:
    for prefix, family in sorted(FAMILIES.items(), key=lambda item: -len(item[0])):
        if arch.startswith(prefix):
            return family
    return arch


def _names(model: Mapping[str, Any]) -> tuple[str, str]:
    """(key, label) of one model value."""
    arch = str(model["arch"])
    options = model.get("arch_kwargs") or {}
    if arch == "coursework_vgg":
        fixes = [n for k, n in (("batch_norm", "BN"), ("residual", "RC")) if model.get(k)]
        label = f"VGG{int(model['depth']):02d}" + (" " + " + ".join(fixes) if fixes else "")
        key = f"vgg{int(model['depth']):02d}" + "".join(f"-{f.lower()}" for f in fixes)
        return key, label
    for prefix, name in (("resnet", "ResNet"), ("plain", "plain")):
        if arch.startswith(prefix) and arch[len(prefix) :].isdigit():
            return arch, f"{name}-{arch[len(prefix) :]}"
    if arch == "googlenet":
        aux = options.get("aux_logits", True)
        key, label = (
            f"googlenet-{'aux' if aux else 'noaux'}",
            f"GoogLeNet {'+ aux' if aux else 'no aux'}",
        )
        if not model.get("batch_norm"):
            key, label = f"{key}-nobn", f"{label}, no BN"
        return key, label
    labels = {"vit_tiny_cifar": "ViT-Ti", "swin_tiny_cifar": "Swin-T", "vgg_cifar10": "VGG (seed)"}
    return arch, labels.get(arch, arch)


def _shared_settings(command: list[str]) -> dict[str, Any]:
    """The sweep command's ``--model.KEY=VALUE`` arguments as settings."""
    shared = {}
    for item in command:
        if isinstance(item, str) and item.startswith("--model.") and "=" in item:
            key, value = item.removeprefix("--model.").split("=", 1)
            shared[key] = yaml.safe_load(value)
    return shared


def model_specs(path: str | Path = SWEEP_FILE) -> tuple[list[ModelSpec], list[str]]:
    """The sweep's models (in its order) and datasets.

    Raises:
        gradtrace.sweeps.grid.SweepConfigError: no such file, or not a valid sweep.
        ValueError: the sweep has no ``model`` values.
    """
    config = load_sweep(path)
    parameters = config["parameters"]
    values = parameters.get("model", {}).get("values")
    if not values:
        raise ValueError(f"{path} has no model values (parameters.model.values)")
    datasets = parameters.get("data.dataset", {}).get("values") or []
    shared = _shared_settings(config["command"])
    specs = []
    for value in values:
        key, label = _names(value)
        specs.append(ModelSpec(key, label, _family(str(value["arch"])), {**shared, **value}))
    return specs, list(datasets)
