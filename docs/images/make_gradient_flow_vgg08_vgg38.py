"""Draw docs/images/gradient_flow_vgg08_vgg38.png: VGG08 vs plain VGG38 at initialisation.

One optimizer step of each coursework network on a batch of 100 random 32x32 images (100
classes, cross-entropy, Adam), measured by ``GradientFlow`` and drawn by ``gradtrace.plots``.
Run: ``python docs/images/make_gradient_flow_vgg08_vgg38.py`` (CPU, about a minute).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from tempfile import TemporaryDirectory

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from gradtrace import GradientFlow
from gradtrace.models import create_model
from gradtrace.plots import plot_gradient_flow, save_figure


class Classifier(pl.LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.net = create_model(name, num_classes=100)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def measure(name: str, data: TensorDataset, root: str) -> list[dict]:
    torch.manual_seed(0)
    callback = GradientFlow(every_n_steps=1, plot=False, warmup_steps=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
        callbacks=[callback],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # VGG38's vanishing warning is the point of the figure
        trainer.fit(Classifier(name), DataLoader(data, batch_size=100))
    print(f"{name}: input/output mean |grad| ratio {callback.input_output_ratio():.2g}")
    return callback.history


def main() -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(100, 3, 32, 32, generator=g), torch.randint(0, 100, (100,), generator=g)
    )
    with TemporaryDirectory() as root:
        vgg08, vgg38 = measure("vgg08", data, root), measure("vgg38", data, root)
    fig = plot_gradient_flow(vgg08, x="depth", label="VGG08")
    plot_gradient_flow(
        vgg38,
        x="depth",
        ax=fig.axes[0],
        label="VGG38 (plain)",
        title="Gradient flow at initialisation: mean |grad| of each layer's weights",
    )
    out = save_figure(fig, Path(__file__).with_name("gradient_flow_vgg08_vgg38.png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
