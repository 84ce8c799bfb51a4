"""Where GradientFlow writes and under which names it logs: never the bare working directory,
never over an earlier fit's records, never under another instance's metric names."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradtrace import GradientFlow, read_history
from helpers.fits import quiet_trainer
from helpers.logs import rank_zero_lines


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,))), 4)


def trainer(callbacks: list[pl.Callback], **options) -> pl.Trainer:
    return quiet_trainer(None, callbacks, **{"max_steps": 2, **options})


@pytest.mark.parametrize("options", [{"logger": False}, {"fast_dev_run": True}])
def test_without_a_logger_the_files_go_under_default_root_dir_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: dict
) -> None:
    monkeypatch.chdir(tmp_path)  # no default_root_dir: Lightning uses the working directory
    flow = GradientFlow(every_n_steps=1)
    trainer([flow], **options).fit(Net(), loader())
    assert flow.csv_path == tmp_path / "gradient_flow" / "gradient_flow.csv"
    assert read_history(flow.csv_path)
    assert sorted(os.listdir(tmp_path)) == ["gradient_flow"]


def test_an_earlier_fit_in_the_same_directory_is_kept_and_said_once(tmp_path: Path) -> None:
    flows = [GradientFlow(every_n_steps=1, plot=False) for _ in range(3)]
    with rank_zero_lines() as lines:
        for flow in flows:
            trainer([flow], logger=False, default_root_dir=tmp_path).fit(Net(), loader())
    folder = tmp_path / "gradient_flow"
    assert [f.csv_path for f in flows] == [
        folder / "gradient_flow.csv",
        folder / "gradient_flow-v1.csv",
        folder / "gradient_flow-v2.csv",
    ]
    for flow in flows:
        assert len(read_history(flow.csv_path)) == 2 * 2
    said = [line for line in lines if "earlier fit" in line]
    assert len(said) == 2
    assert "gradient_flow.csv holds an earlier fit's records" in said[0]
    assert said[0].endswith("writes gradient_flow-v1.csv beside it")


def test_a_second_fit_reusing_a_wandb_run_keeps_the_first_fits_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="p", dir=str(tmp_path))
    try:
        flows = []
        for _ in range(2):  # Lightning hands the active run to each new WandbLogger
            flow = GradientFlow(every_n_steps=1, plot=False)
            logger = WandbLogger(project="p", save_dir=str(tmp_path))
            trainer([flow], logger=logger, default_root_dir=tmp_path).fit(Net(), loader())
            flows.append(flow)
    finally:
        run.finish()
    assert flows[0].csv_path.parent == flows[1].csv_path.parent  # one run, one directory
    assert flows[1].csv_path.name == "gradient_flow-v1.csv"
    assert len(read_history(flows[0].csv_path)) == len(read_history(flows[1].csv_path)) == 4


def metric_names(log_dir: str) -> set[str]:
    with (Path(log_dir) / "metrics.csv").open(newline="") as f:
        return set(csv.DictReader(f).fieldnames or [])


def test_two_instances_log_under_distinct_names_and_summaries_start_at_step_0(
    tmp_path: Path,
) -> None:
    gradients = GradientFlow(every_n_steps=1, plot=False)
    acts = GradientFlow(every_n_steps=1, plot=False, activations=True, filename="acts.csv")
    again = GradientFlow(every_n_steps=1, plot=False, dirpath=tmp_path / "elsewhere")
    logger = CSVLogger(tmp_path)
    trainer([gradients, acts, again], logger=logger, log_every_n_steps=50).fit(Net(), loader())
    assert (gradients.namespace, acts.namespace, again.namespace) == (
        "grad_flow",
        "grad_flow-acts",
        "grad_flow-2",
    )
    names = metric_names(logger.log_dir)
    for namespace in ("grad_flow", "grad_flow-acts", "grad_flow-2"):
        assert f"{namespace}/mean_abs/net.0.weight" in names
        assert f"{namespace}/grad_norm" in names
    assert "grad_flow-acts/act_mean/net.0.weight" in names
    assert not any(name.startswith("grad_flow/act_") for name in names)
    # Lightning writes step 0 only at its own logging steps (every 50): the summary scalars
    # come with the per-layer values at every measured step, step 0 included
    with (Path(logger.log_dir) / "metrics.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("grad_flow/grad_norm")]
    assert sorted(int(r["step"]) for r in rows) == [0, 1]
    for row in rows:
        assert float(row["grad_flow/input_output_ratio"]) > 0
        assert row["grad_flow/mean_abs/net.0.weight"]
