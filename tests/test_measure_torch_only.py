"""``gradtrace.measure`` needs torch alone: in a fresh virtual environment holding exactly
torch's dependency closure (no Lightning, torchvision, matplotlib), every module of the core
imports and ``grad_stats`` measures a plain PyTorch model, equal to an independent
computation of each gradient's statistics."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest

from helpers.venvs import base_closure, run_python, venv_with

PLAIN_LOOP = """
import importlib, importlib.util, json, pkgutil
import torch
from torch import nn

import gradtrace.measure
core = gradtrace.measure
modules = sorted(m.name for m in pkgutil.walk_packages(core.__path__, "gradtrace.measure."))
for name in modules:
    importlib.import_module(name)
from gradtrace import grad_stats  # the top-level name too
from gradtrace.measure import select_layers

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 8, 8)), torch.tensor([1, 3]))
loss.backward()
stats = {k: float(v) for k, v in grad_stats(model).items()}
independent = {}
for name, p in model.named_parameters():
    g = p.grad.double()
    independent[f"mean_abs/{name}"] = float(g.abs().mean())
    independent[f"l2/{name}"] = float(g.norm())
    independent[f"max_abs/{name}"] = float(g.abs().max())
    independent[f"nonfinite/{name}"] = 0.0
print(json.dumps({
    "absent": [m for m in ("lightning", "pytorch_lightning", "torchvision", "matplotlib")
               if importlib.util.find_spec(m) is not None],
    "modules": modules,
    "layers": [layer.name for layer in select_layers(model)],
    "stats": stats,
    "independent": independent,
    "torch": torch.__file__,
}))
"""


@pytest.mark.slow
@pytest.mark.integration
def test_the_core_imports_and_measures_with_torch_alone(tmp_path: Path) -> None:
    torch_alone = [metadata.distribution("torch"), *base_closure("torch")]
    python, site, linked = venv_with(tmp_path / "venv", torch_alone)
    assert "torch" in linked
    assert not linked & {"lightning", "pytorch_lightning", "lightning_utilities", "torchvision"}
    done = run_python(python, PLAIN_LOOP)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["absent"] == []  # none of them importable there
    assert result["torch"].startswith(str(site))  # really the venv's torch
    assert {"gradtrace.measure.stats", "gradtrace.measure.order"} <= set(result["modules"])
    assert result["layers"] == ["0.weight", "3.weight"]
    assert result["stats"].keys() == result["independent"].keys()
    for key, value in result["independent"].items():
        assert result["stats"][key] == pytest.approx(value, rel=1e-6), key
