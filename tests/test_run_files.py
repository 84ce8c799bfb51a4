import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from gradtrace import GradientFlow
from gradtrace.cli.run_files import FinishedRun, RunFilesError, find_runs, read_run


class TinyNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_reads_what_a_lightning_fit_wrote(tmp_path):
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    logger = CSVLogger(tmp_path, name="run", version="")
    flow = GradientFlow(every_n_steps=1, plot=False)
    trainer = L.Trainer(
        max_steps=4,
        logger=logger,
        callbacks=[flow],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyNet(), loader)

    run = read_run(logger.log_dir)
    assert run.name == "run"
    assert run.config == {}  # TinyNet saves no hyperparameters
    losses = run.series("train/loss")
    assert [step for step, _ in losses] == [0, 1, 2, 3]
    assert run.last("train/loss") == pytest.approx(losses[-1][1])
    assert run.last("no/such/metric") is None
    layers = {r["layer"] for r in run.gradient_flow}
    assert layers == {"net.0.weight", "net.2.weight"}
    assert [r["mean_abs"] for r in run.gradient_flow] == pytest.approx(
        [r["mean_abs"] for r in flow.history]
    )


def test_resumed_rows_replace_earlier_values_and_configs_are_read(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,val/acc,train/loss\n0,9,0.5,\n0,9,,1.25\n0,9,0.75,\n1,19,nan,\n"
    )
    (tmp_path / "config.yaml").write_text("model:\n  lr: 0.01\n")
    run = read_run(tmp_path)
    assert isinstance(run, FinishedRun)
    assert run.config == {"model": {"lr": 0.01}}
    assert run.gradient_flow == []
    assert run.last("val/acc") == 0.75  # the nan row is skipped
    assert run.series("val/acc") == [(9, 0.75)]
    assert math.isnan(run.metrics[-1]["val/acc"])


def test_bad_directories_get_one_line_naming_the_path(tmp_path):
    with pytest.raises(RunFilesError, match=r"missing: no such run directory$"):
        read_run(tmp_path / "missing")
    with pytest.raises(RunFilesError, match=r"not a run directory \(no metrics.csv"):
        read_run(tmp_path)
    (tmp_path / "gradient_flow.csv").write_text("epoch,loss\n0,1.0\n")
    with pytest.raises(RunFilesError, match=r"gradient_flow.csv: not a gradient-flow CSV") as err:
        read_run(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "gradient_flow.csv").unlink()
    (tmp_path / "metrics.csv").write_text("step,val/acc\n0,high\n")
    with pytest.raises(RunFilesError, match=r"metrics.csv:2: column 'val/acc' holds 'high'"):
        read_run(tmp_path)


def test_find_runs_takes_a_run_or_a_folder_of_runs(tmp_path):
    for name in ("b", "a"):
        (tmp_path / "sweep" / name).mkdir(parents=True)
        (tmp_path / "sweep" / name / "metrics.csv").write_text("step,val/acc\n0,0.5\n")
    (tmp_path / "sweep" / "notes").mkdir()  # not a run: skipped
    assert find_runs(tmp_path / "sweep" / "a") == [tmp_path / "sweep" / "a"]
    assert find_runs(tmp_path / "sweep") == [tmp_path / "sweep" / "a", tmp_path / "sweep" / "b"]
    with pytest.raises(RunFilesError, match=r"notes: not a run directory .* no run directories"):
        find_runs(tmp_path / "sweep" / "notes")
    with pytest.raises(RunFilesError, match=r"nowhere: no such run directory$"):
        find_runs(tmp_path / "nowhere")
