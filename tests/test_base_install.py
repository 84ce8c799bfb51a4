"""The base install (torch + lightning) is enough for ``from gradtrace import GradientFlow``.

Two checks: in this environment, importing gradtrace and the callback runs no import statement
for the optional packages; and in a fresh virtual environment that holds exactly
gradtrace's base dependency closure (no torchvision, matplotlib, timm, wandb), a ``fit`` with
the callback runs and skips the plots with one info line.
"""

from __future__ import annotations

import builtins
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers.venvs import base_closure, run_python, venv_with

OPTIONAL = ("torchvision", "timm", "wandb", "matplotlib")


def imports_while(action: Callable[[], object]) -> set[str]:
    """Top-level names of every import statement executed during ``action()``, with gradtrace
    imported afresh (its modules are put back afterwards)."""
    seen: set[str] = set()
    original = builtins.__import__

    def recording(name: str, *args: object, **kwargs: object) -> object:
        if name:
            seen.add(name.split(".")[0])
        return original(name, *args, **kwargs)

    saved = {k: v for k, v in sys.modules.items() if k == "gradtrace" or k.startswith("gradtrace.")}
    for key in saved:
        del sys.modules[key]
    builtins.__import__ = recording
    try:
        action()
    finally:
        builtins.__import__ = original
        for key in [k for k in sys.modules if k == "gradtrace" or k.startswith("gradtrace.")]:
            del sys.modules[key]
        sys.modules.update(saved)
    return seen


def test_import_gradtrace_and_the_callback_pulls_no_optional_package() -> None:
    # Lightning itself may import torchvision/matplotlib when they are installed (via
    # torchmetrics); what counts is that gradtrace's own import statements never ask for them,
    # even when they are already loaded. Import statements are recorded, not sys.modules.
    def import_callback() -> None:
        from gradtrace import GradientFlow, GradientFlowWarning  # noqa: F401

    importlib.import_module("lightning.pytorch")  # first, so only gradtrace's imports run below
    bare = imports_while(lambda: importlib.import_module("gradtrace"))
    assert not bare & {"torch", "lightning", *OPTIONAL}  # `import gradtrace` alone is light
    with_callback = imports_while(import_callback)
    assert {"torch", "lightning"} <= with_callback  # the recorder sees the real imports
    assert not with_callback & set(OPTIONAL)


FIT_WITHOUT_EXTRAS = """
import importlib.util, json, logging
lines = []
class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
logging.getLogger("lightning.pytorch.utilities.rank_zero").addHandler(Keep())

import torch
import lightning.pytorch as pl
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from gradtrace import GradientFlow
from gradtrace.measure import read_history

class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
callback = GradientFlow(every_n_steps=1)
trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False,
                     default_root_dir=OUT, callbacks=[callback])
trainer.fit(Model(), DataLoader(data, batch_size=4))
print(json.dumps({
    "missing": [m for m in OPTIONAL if importlib.util.find_spec(m) is None],
    "info": [line for line in lines if "GradientFlow" in line],
    "rows": len(read_history(callback.csv_path)),
    "layers": callback.layer_order,
    "torch": torch.__file__,
}))
"""


@pytest.mark.slow
@pytest.mark.integration
def test_fit_in_a_fresh_venv_with_only_the_base_install(tmp_path: Path) -> None:
    python, site, linked = venv_with(tmp_path / "venv", base_closure())
    assert {"torch", "lightning", "pytorch_lightning", "lightning_utilities"} <= linked
    assert not linked & set(OPTIONAL)

    out = tmp_path / "run"
    code = f"OUT = {str(out)!r}\nOPTIONAL = {OPTIONAL!r}\n" + FIT_WITHOUT_EXTRAS
    done = run_python(python, code)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["missing"] == list(OPTIONAL)  # none of them importable there
    assert result["torch"].startswith(str(site))  # really the venv's, not this environment's
    assert len(result["info"]) == 1
    assert "no gradient-flow plots" in result["info"][0]
    assert result["layers"] == ["net.0.weight", "net.2.weight"]
    assert result["rows"] == 4 * 2
    assert not (out / "gradient_flow" / "gradient_flow").exists()  # no plots, CSV only
