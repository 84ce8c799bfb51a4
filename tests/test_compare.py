"""``gradtrace compare`` and ``compare_runs``: table values, the figure, bad input; and the
activation panel of the gradient-flow figures."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("matplotlib")

from gradtrace import GradientFlow
from gradtrace.cli.compare import compare_runs, first_problem_layer, markdown_table
from gradtrace.cli.main import main
from gradtrace.measure import input_output_ratio, read_history
from gradtrace.plots import plot_activation_flow, plot_gradient_flow, plot_runs

COLUMNS = [
    "step",
    "layer",
    "mean_abs",
    "act_mean",
    "act_std",
    "act_zero_frac",
    "act_sat_frac",
    "act_grad_mean_abs",
]


def flow_records(depth: int, zero: dict[int, float], sat: dict[int, float]) -> list[dict]:
    """Weights and biases of ``depth`` layers over steps 0..40; activations on weights only."""
    records = []
    for step in range(0, 50, 10):
        for i in range(depth):
            weight = {
                "step": step,
                "layer": f"net.l{i}.weight",
                "mean_abs": 10.0 ** (i - depth) * (1 + step / 100),
                "act_mean": 0.1,
                "act_std": 1.0,
                "act_zero_frac": zero.get(i, 0.4),
                "act_grad_mean_abs": 10.0 ** (i - depth + 1),
            }
            if i in sat:
                weight["act_sat_frac"] = sat[i]
            records += [weight, {"step": step, "layer": f"net.l{i}.bias", "mean_abs": 1e-3}]
    return records


def write_run(folder: Path, records: list[dict], val_acc: list[float] | None) -> Path:
    folder.mkdir(parents=True)
    with (folder / "gradient_flow.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in records:
            writer.writerow([r.get(c, "") for c in COLUMNS])
    with (folder / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "train/loss", "val/acc"])
        for epoch, acc in enumerate(val_acc or []):
            writer.writerow([epoch, 10 * epoch, 1.0, ""])
            writer.writerow([epoch, 10 * epoch, "", acc])
    return folder


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    relu = write_run(tmp_path / "relu", flow_records(4, {2: 0.97}, {}), [0.5, 0.81])
    tanh = write_run(tmp_path / "tanh", flow_records(6, {}, {1: 0.5, 3: 0.95}), [0.1, 0.1])
    return relu, tanh


def test_compare_runs_table_and_figure(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    relu, tanh = two_runs
    png = tmp_path / "out" / "flow.png"
    rows = compare_runs([relu, tanh], output=png, last_n_steps=2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [row.val_acc for row in rows] == [0.81, 0.1]
    assert rows[0].label == "relu (val acc 81.0%)"
    history = read_history(relu / "gradient_flow.csv")
    recent = [r for r in history if r["step"] in (30, 40)]
    assert rows[0].input_output_ratio == pytest.approx(input_output_ratio(recent, last_n=2))
    assert rows[0].first_problem == "net.l2.weight (dead, 97%)"
    assert rows[1].first_problem == "net.l3.weight (saturated, 95%)"
    assert markdown_table(rows).splitlines() == [
        "| run | val acc | input/output ratio | first dead/saturated layer |",
        "|---|---:|---:|---|",
        f"| relu | 81.0% | {rows[0].input_output_ratio:.2e} | net.l2.weight (dead, 97%) |",
        f"| tanh | 10.0% | {rows[1].input_output_ratio:.2e} | net.l3.weight (saturated, 95%) |",
    ]
    # the folder holding both runs (a sweep's output folder) compares the same runs
    assert compare_runs([relu.parent], last_n_steps=2) == rows


def test_first_problem_layer_thresholds_and_runs_without_activations() -> None:
    records = flow_records(3, {1: 0.92}, {})
    assert first_problem_layer(records) == "net.l1.weight (dead, 92%)"
    assert first_problem_layer(records, dead_fraction=0.95) == "none"
    plain = [{k: v for k, v in r.items() if not k.startswith("act")} for r in records]
    assert first_problem_layer(plain) == "not recorded"
    with pytest.raises(ValueError, match="dead_fraction must be in"):
        first_problem_layer(records, dead_fraction=2.0)


def test_the_command_prints_the_table_and_writes_the_png(
    two_runs: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    png = tmp_path / "cmp.png"
    with pytest.raises(SystemExit) as done:
        main(["compare", *map(str, two_runs), "-o", str(png)])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "| relu | 81.0% |" in out
    assert "| tanh | 10.0% |" in out
    assert png.is_file()


def test_bad_input_gets_one_line_naming_the_path(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "gradient_flow.csv").write_text("epoch,loss\n0,1.0\n")
    no_grads = tmp_path / "no_grads"
    no_grads.mkdir()
    (no_grads / "gradient_flow.csv").write_text("step,layer,l2\n0,a.weight,1.0\n")
    only_metrics = tmp_path / "only_metrics"
    only_metrics.mkdir()
    (only_metrics / "metrics.csv").write_text("step,val/acc\n0,0.5\n")
    for folder, expected in [
        (empty, "not a run directory"),
        (wrong, "not a gradient-flow CSV"),
        (no_grads, "no mean_abs values"),
        (only_metrics, "no gradient-flow records"),
        (tmp_path / "missing", "no such run directory"),
    ]:
        with pytest.raises(SystemExit) as done:
            main(["compare", str(folder), "-o", str(tmp_path / "x.png")])
        assert done.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert err.startswith("gradtrace: error: "), err
        assert str(folder) in err, err
        assert expected in err
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- figures


def test_the_activation_panel_sits_above_the_gradients_on_the_same_x() -> None:
    records = flow_records(3, {1: 0.9}, {2: 0.7})
    fig = plot_gradient_flow(records, title="t")
    top, bottom = fig.axes
    assert top.get_position().y0 > bottom.get_position().y0
    assert top.get_shared_x_axes().joined(top, bottom)
    order = [t.get_text() for t in bottom.get_xticklabels()]
    assert order[:3] == ["net.l0.weight", "net.l0.bias", "net.l1.weight"]
    zeros, sat = top.lines
    # activation values sit at the x of their weight rows (0, 2, 4), biases have none
    assert list(zeros.get_xdata()) == [0.0, 2.0, 4.0]
    assert list(zeros.get_ydata()) == pytest.approx([0.4, 0.9, 0.4])
    assert list(sat.get_xdata()) == [4.0]
    assert list(sat.get_ydata()) == pytest.approx([0.7])
    grads, output_grads = bottom.lines
    assert list(grads.get_xdata()) == list(range(6))
    assert list(output_grads.get_xdata()) == [0.0, 2.0, 4.0]
    assert list(output_grads.get_ydata()) == pytest.approx([1e-2, 1e-1, 1.0])
    assert top.get_title() == "t"
    # without activation statistics: one panel, as before
    plain = [{k: v for k, v in r.items() if not k.startswith("act")} for r in records]
    assert len(plot_gradient_flow(plain).axes) == 1


def test_runs_overlay_by_relative_depth() -> None:
    deep = flow_records(4, {}, {1: 0.95})
    shallow = [
        {k: v for k, v in r.items() if not k.startswith("act")} for r in flow_records(2, {}, {})
    ]
    fig = plot_runs({"deep": deep, "shallow": shallow}, last_n_steps=1)
    top, bottom = fig.axes
    labels = [line.get_label() for line in bottom.lines]
    assert labels == ["deep", "deep: dL/d output", "shallow"]
    assert list(bottom.lines[2].get_xdata()) == pytest.approx([0, 1 / 3, 2 / 3, 1])
    # the last step only: step 40's mean_abs of the deep run's first layer
    assert bottom.lines[0].get_ydata()[0] == pytest.approx(1e-4 * 1.4)
    assert [line.get_label() for line in top.lines] == ["deep: zeros", "deep: saturated"]
    assert list(top.lines[1].get_xdata()) == pytest.approx([2 / 7])


def test_activation_panel_needs_activation_statistics() -> None:
    with pytest.raises(ValueError, match="no activation statistics"):
        plot_activation_flow([{"step": 0, "layer": "a", "mean_abs": 1.0}])


def test_an_absent_saturation_reads_back_as_nan(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", flow_records(1, {}, {}), None)
    record = read_history(run / "gradient_flow.csv")[0]
    assert math.isnan(record["act_sat_frac"])
    assert record["act_zero_frac"] == 0.4


class TinyClassifier(pl.LightningModule):
    """An MLP logging val/acc; ``dead=True`` gives its second layer a bias of -10."""

    def __init__(self, dead: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.net.append(nn.Linear(16, 3))
        if dead:
            with torch.no_grad():
                self.net[2].bias.fill_(-10.0)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_compare_two_runs_that_lightning_wrote(tmp_path: Path, capsys) -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    dirs = []
    for name in ("healthy", "dead"):
        logger = CSVLogger(tmp_path, name=name, version="")
        trainer = pl.Trainer(
            max_epochs=2,
            logger=logger,
            callbacks=[GradientFlow(every_n_steps=1, plot=False, activations=True)],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        loader = DataLoader(data, batch_size=8)
        trainer.fit(TinyClassifier(dead=name == "dead"), loader, loader)
        dirs.append(logger.log_dir)
    png = tmp_path / "flow.png"
    with pytest.raises(SystemExit) as done:
        main(["compare", *dirs, "-o", str(png)])
    assert done.value.code == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert table[1].startswith("| healthy |")
    assert table[1].endswith("| none |")
    assert table[2].startswith("| dead |")
    assert table[2].endswith("| net.2.weight (dead, 100%) |")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
