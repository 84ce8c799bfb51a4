"""GradientFlow under Lightning's ``ModelParallelStrategy`` on 2 CPU processes: the model is
``fully_shard``-ed on the ``data_parallel`` sub-mesh (1 rank) of a (1, 2) data x tensor
parallel mesh, so each tensor-parallel rank holds a whole copy of every gradient as a
1-rank shard. Summed over the world, each would count twice (l2 x sqrt 2).

``python model_parallel_gradient_flow.py OUT {single,model_parallel}`` writes
``<mode>.json``, the callback's history on global rank 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradtrace import GradientFlow


class Model(pl.LightningModule):
    def __init__(self, shard: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
        )
        self.shard = shard

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        # every rank the same batches: tensor-parallel ranks see the same data
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(
            torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
        )
        return DataLoader(data, batch_size=8)


def main(out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    callback = GradientFlow(every_n_steps=1, plot=False)
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2 if mode == "model_parallel" else 1,
        strategy=strategy if mode == "model_parallel" else "auto",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out / mode,
        callbacks=[callback],
        use_distributed_sampler=False,
    )
    trainer.fit(Model(shard=mode == "model_parallel"))
    if trainer.is_global_zero:
        (out / f"{mode}.json").write_text(json.dumps(callback.history))
    for proc in getattr(trainer.strategy.launcher, "procs", []):  # rank 0 waits for rank 1
        proc.wait(timeout=120)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
