"""What GradientFlow writes and when: its arguments, the cadence (Lightning's logging steps), the
CSV and its run directory (loggers, W&B, an explicit dirpath, after an exception), the loggers'
metrics and summary scalars, the bounded history, histograms and plots."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

from gradtrace import GradientFlow, GradientFlowWarning
from gradtrace.measure import read_history
from gradtrace.measure.records import BoundedHistory
from helpers.fits import fit
from helpers.logs import rank_zero_lines
from helpers.records import by_step
from helpers.tiny import FLOW, Classifier, TinyNet, make_data


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"stats": ("mean_abs", "median")},
            "stats entry must be one of mean_abs, l2, max_abs, nonfinite; got 'median'",
        ),
        ({"stats": ()}, "stats must name at least one of mean_abs, l2, max_abs, nonfinite"),
        ({"stats": ("l2",)}, "plot=True draws mean_abs, so stats must include 'mean_abs'"),
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1 or None; got 0"),
        ({"every_n_steps": 2.5}, "every_n_steps must be an integer >= 1 or None; got 2.5"),
        ({"history_size": 0}, "history_size must be an integer >= 1 or None; got 0"),
        ({"include": [None]}, "include entries must be name globs such as"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0; got -1"),
        ({"vanishing_ratio": 0}, r"vanishing_ratio must be a number in \(0, 1\) or None; got 0"),
        ({"vanishing_ratio": 2}, r"vanishing_ratio must be a number in \(0, 1\) or None; got 2"),
        ({"exploding_ratio": 0.5}, "exploding_ratio must be a finite number > 1 or None; got 0.5"),
        ({"exploding_ratio": math.inf}, "exploding_ratio must be a finite number > 1"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite must be one of warn, raise; got 'ignore'"),
        ({"filename": "a/b.csv"}, "filename must be a plain file name"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradientFlow(**kwargs)


def test_every_n_steps_follows_log_every_n_steps(tmp_path: Path) -> None:
    torch.manual_seed(12)
    cb = GradientFlow(plot=False)
    fit(tmp_path, Classifier(TinyNet()), cb, data=make_data(28), log_every_n_steps=3)
    assert sorted({r["step"] for r in cb.history}) == [0, 2, 5, 6]


def test_log_every_n_steps_zero_measures_the_first_and_last_step_and_says_so(
    tmp_path: Path,
) -> None:
    cb = GradientFlow(plot=False)
    with pytest.warns(GradientFlowWarning, match=r"log_every_n_steps=0\): only the first and"):
        fit(tmp_path, Classifier(TinyNet()), cb, log_every_n_steps=0)
    assert sorted({r["step"] for r in cb.history}) == [0, 1]  # 8 samples, batches of 4


def metrics_rows(log_dir: str | Path) -> list[dict[str, str]]:
    with open(Path(log_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_every_step_lightning_logs_has_a_record_and_summary_scalars(tmp_path: Path) -> None:
    torch.manual_seed(20)
    cb = GradientFlow(plot=False)
    logger = CSVLogger(tmp_path, name="run")
    model = Classifier(TinyNet())
    callbacks = [cb, LearningRateMonitor(logging_interval="step")]
    fit(
        tmp_path,
        model,
        cb,
        logger=logger,
        callbacks=callbacks,
        data=make_data(32),
        log_every_n_steps=3,
    )

    rows = metrics_rows(logger.log_dir)
    lr_steps = {int(r["step"]) for r in rows if r.get("lr-SGD")}
    assert lr_steps == {2, 5}  # (step + 1) % 3 == 0, 8 steps
    # the same steps, plus step 0 (the initialisation) and the last step
    assert sorted({r["step"] for r in cb.history}) == [0, 2, 5, 7]
    # summary scalars went through pl_module.log, written by the loggers with the other metrics
    ratio_rows = {int(r["step"]): r for r in rows if r.get("grad_flow/input_output_ratio")}
    assert set(ratio_rows) >= lr_steps
    steps = by_step(cb.history)
    for step in lr_steps:
        layers = steps[step]
        want = layers[FLOW[0]]["mean_abs"] / layers[FLOW[-1]]["mean_abs"]
        assert float(ratio_rows[step]["grad_flow/input_output_ratio"]) == pytest.approx(
            want, rel=1e-5
        )
        seen = next(s for s in model.seen if s["step"] == step)["grads"]
        norm = math.sqrt(sum(g.double().square().sum().item() for g in seen.values()))
        assert float(ratio_rows[step]["grad_flow/grad_norm"]) == pytest.approx(norm, rel=1e-5)
        assert float(ratio_rows[step]["grad_flow/nonfinite"]) == 0
    assert "grad_flow/input_output_ratio" in model.trainer.callback_metrics


def test_csv_and_logger_keys(tmp_path: Path) -> None:
    torch.manual_seed(10)
    cb = GradientFlow(every_n_steps=1, plot=False)
    logger = CSVLogger(tmp_path, name="run")
    fit(tmp_path, Classifier(TinyNet()), cb, logger=logger, max_epochs=2, log_every_n_steps=1)

    assert cb.csv_path == Path(logger.log_dir) / "gradient_flow.csv"
    assert read_history(cb.csv_path) == cb.history
    assert len(cb.history) == 4 * len(FLOW)
    with open(cb.csv_path, newline="") as f:
        assert next(csv.reader(f)) == ["step", "layer", "mean_abs", "l2", "max_abs", "nonfinite"]
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected_keys = {
        f"grad_flow/{s}/{layer}"
        for s in ("mean_abs", "l2", "max_abs", "nonfinite")
        for layer in FLOW
    }
    assert expected_keys <= set(rows[0])
    for record in cb.history:
        row = next(
            r
            for r in rows
            if r["step"] == str(record["step"]) and r[f"grad_flow/l2/{record['layer']}"] != ""
        )
        assert float(row[f"grad_flow/l2/{record['layer']}"]) == pytest.approx(record["l2"])


class FailsAtBatch(Classifier):
    def training_step(self, batch, batch_idx):
        if batch_idx == 3:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_csv_is_on_disk_after_an_exception_mid_fit(tmp_path: Path) -> None:
    torch.manual_seed(11)
    cb = GradientFlow(every_n_steps=1, optimizer_stats=True)
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, FailsAtBatch(TinyNet()), cb, data=make_data(24))
    on_disk = read_history(cb.csv_path)
    assert sorted({r["step"] for r in on_disk}) == [0, 1, 2]
    assert on_disk == cb.history


def test_wandb_first_logger_gets_one_csv_per_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    save_dir = tmp_path / "wb"
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        # histograms exercise wandb.Histogram (offline runs cannot be read back here)
        cb = GradientFlow(every_n_steps=1, plot=False, histogram_every_n_steps=1)
        logger = WandbLogger(save_dir=str(save_dir), offline=True, project="proj")
        fit(tmp_path, Classifier(TinyNet()), cb, logger=logger, max_steps=2)
        logger.experiment.finish()
        assert cb.csv_path == save_dir / "proj" / logger.version / "gradient_flow.csv"
        assert read_history(cb.csv_path) == cb.history
        paths.append(cb.csv_path)
    assert paths[0] != paths[1]
    assert not (tmp_path / "gradient_flow.csv").exists()
    assert not (save_dir / "gradient_flow.csv").exists()


def test_explicit_dirpath(tmp_path: Path) -> None:
    cb = GradientFlow(every_n_steps=1, plot=False, dirpath=tmp_path / "here")
    fit(tmp_path, Classifier(TinyNet()), cb, logger=CSVLogger(tmp_path), max_steps=1)
    assert cb.csv_path == tmp_path / "here" / "gradient_flow.csv"
    assert len(read_history(cb.csv_path)) == len(FLOW)


def test_history_stays_bounded_over_100k_steps(tmp_path: Path) -> None:
    """The store behind ``GradientFlow.history`` over 100k measured steps of a three-layer
    model, then a fit: ``history`` keeps the last ``history_size`` steps, the CSV all."""
    history = BoundedHistory(50)
    layers = ["a.weight", "b.weight", "c.weight"]
    for step in range(100_000):
        history.extend({"step": step, "layer": name, "mean_abs": 1.0} for name in layers)
    assert len(history) == 3 * 50
    records = history.records()
    assert [r["step"] for r in records[::3]] == list(range(100_000 - 50, 100_000))
    assert [r["layer"] for r in records[:3]] == layers

    cb = GradientFlow(every_n_steps=1, plot=False, history_size=2)
    fit(tmp_path, Classifier(TinyNet()), cb, data=make_data(20))  # 5 steps
    assert len(cb.history) == 3 * 2
    assert [r["step"] for r in cb.history[::3]] == [3, 4]
    assert [r["layer"] for r in cb.history[:3]] == FLOW
    assert [r["step"] for r in read_history(cb.csv_path)[::3]] == [0, 1, 2, 3, 4]


def test_histograms_go_to_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(27)
    cb = GradientFlow(every_n_steps=1, plot=False, histogram_every_n_steps=2)
    logger = TensorBoardLogger(tmp_path, name="tb")
    model = Classifier(TinyNet())
    fit(tmp_path, model, cb, logger=logger, data=make_data(12))
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    tags = {f"grad_flow/histogram/{name}" for name in FLOW}
    assert tags <= set(events.Tags()["histograms"])
    for name in FLOW:
        histograms = events.Histograms(f"grad_flow/histogram/{name}")
        assert [h.step for h in histograms] == [0, 2]
        grad = next(s for s in model.seen if s["step"] == 2)["grads"][name]
        value = histograms[-1].histogram_value
        assert value.num == grad.numel()
        assert sum(value.bucket) == grad.numel()
        assert value.sum == pytest.approx(grad.sum().item(), rel=1e-4, abs=1e-7)


def test_plots_are_skipped_with_one_info_line_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    cb = GradientFlow(every_n_steps=1)
    with rank_zero_lines() as lines:
        fit(tmp_path, Classifier(TinyNet()), cb, max_epochs=2)
    ours = [line for line in lines if "GradientFlow" in line]
    assert len(ours) == 1
    assert "no gradient-flow plots" in ours[0]
    assert "pip install 'gradtrace[plot]'" in ours[0]
    # no logger: the CSV goes to default_root_dir/gradient_flow/, no plot folder beside it
    assert cb.csv_path == tmp_path / "gradient_flow" / "gradient_flow.csv"
    assert not (tmp_path / "gradient_flow" / "gradient_flow").exists()
    assert len(read_history(cb.csv_path)) == 4 * len(FLOW)


def test_plots_are_saved_and_sent_to_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(15)
    cb = GradientFlow(every_n_steps=1)
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, Classifier(TinyNet()), cb, logger=logger, max_epochs=2)

    folder = Path(logger.log_dir) / "gradient_flow"
    assert sorted(p.name for p in folder.iterdir()) == [
        "epoch_000.png",
        "epoch_001.png",
        "heatmap.png",
    ]
    for png in folder.iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"grad_flow/plot", "grad_flow/heatmap"}
    assert len(events.Images("grad_flow/plot")) == 2
    assert "grad_flow/mean_abs/net.inp.weight" in events.Tags()["scalars"]
