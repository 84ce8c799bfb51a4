"""GradientFlow in projects that install it: cadence, run directory, main path per optimizer,
fp16 with optimizers that unscale themselves, state across resumes, bounded history, summary
scalars and histograms."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from gradtrace import GradientFlow, GradientFlowWarning
from gradtrace.measure import read_history
from gradtrace.measure.records import BoundedHistory
from gradtrace.models import AuxLogits
from helpers.capture import expected_stats
from helpers.fits import fit
from helpers.records import by_step
from helpers.tiny import CLASSES, FLOW, HIDDEN, IN, Chain, Classifier, TinyNet, make_data


def metrics_rows(log_dir: str | Path) -> list[dict[str, str]]:
    with open(Path(log_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- cadence


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


# --------------------------------------------------------------------------- run directory


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


# --------------------------------------------------------------------------- main path


class WithAuxHead(nn.Module):
    """Returns ``AuxLogits`` like GoogLeNet; the auxiliary head is called after the main head,
    so data-flow order alone would make it the output end."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(IN, HIDDEN)
        self.fc = nn.Linear(HIDDEN, CLASSES)
        self.aux = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> AuxLogits:
        h = torch.tanh(self.inp(x))
        return AuxLogits(self.fc(h), (self.aux(h),))


class AuxClassifier(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        return F.cross_entropy(out.logits, y) + 0.3 * F.cross_entropy(out.aux[0], y)


def test_auxiliary_heads_are_measured_but_never_the_output_end(tmp_path: Path) -> None:
    torch.manual_seed(21)
    cb = GradientFlow(every_n_steps=1, plot=False)
    fit(tmp_path, AuxClassifier(WithAuxHead()), cb, max_steps=2)
    # the auxiliary loss is scaled (one more autograd node): its head lies farther from it
    assert cb.layer_order == ["net.inp.weight", "net.aux.weight", "net.fc.weight"]
    assert cb.main_path == ["net.inp.weight", "net.fc.weight"]
    last = by_step(cb.history)[1]
    assert cb.input_output_ratio() == pytest.approx(
        last["net.inp.weight"]["mean_abs"] / last["net.fc.weight"]["mean_abs"]
    )


class GanLike(pl.LightningModule):
    """A generator whose gradient vanishes toward its input, and a healthy critic, each with
    its own optimizer (manual optimization, the GAN recipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = Chain(1e-6)
        self.critic = nn.Sequential(nn.Linear(CLASSES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        opt_g, opt_c = self.optimizers()
        fake = self.generator(x)
        opt_c.zero_grad()
        self.manual_backward(self.critic(fake.detach()).mean())
        opt_c.step()
        opt_g.zero_grad()
        self.manual_backward(-self.critic(fake).mean())
        opt_g.step()

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.generator.parameters(), lr=0.0),
            torch.optim.SGD(self.critic.parameters(), lr=0.0),
        )


def test_each_optimizer_is_diagnosed_on_its_own_layers(tmp_path: Path) -> None:
    torch.manual_seed(22)
    cb = GradientFlow(every_n_steps=1, plot=False, warmup_steps=0)
    model = GanLike()
    with pytest.warns(GradientFlowWarning) as caught:
        fit(tmp_path, model, cb, max_steps=4)  # 2 batches x 2 optimizer steps
    messages = [str(w.message) for w in caught if w.category is GradientFlowWarning]
    assert len(messages) == 1
    assert messages[0].startswith(
        "Gradients vanish at step 0: mean |grad| of the input-side layer "
        "'generator.layers.0.weight' is"
    )
    assert "output-side layer 'generator.layers.3.weight'" in messages[0]
    metrics = model.trainer.callback_metrics
    step = by_step(cb.history)[1]
    want_g = (
        step["generator.layers.0.weight"]["mean_abs"]
        / step["generator.layers.3.weight"]["mean_abs"]
    )
    want_c = step["critic.0.weight"]["mean_abs"] / step["critic.2.weight"]["mean_abs"]
    assert metrics["grad_flow/input_output_ratio"].item() == pytest.approx(want_g, rel=1e-5)
    assert metrics["grad_flow/input_output_ratio/optimizer_1"].item() == pytest.approx(
        want_c, rel=1e-5
    )


# --------------------------------------------------------------------------- fp16


class FusedAdam(Classifier):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)


def test_fp16_with_an_optimizer_that_unscales_itself(tmp_path: Path) -> None:
    """Lightning skips ``unscale_`` for fused Adam, so the hook sees gradients x the scale."""
    from lightning.pytorch.plugins import MixedPrecision

    torch.manual_seed(23)
    model = FusedAdam(TinyNet())
    cb = GradientFlow(every_n_steps=1, plot=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientFlowWarning)
        fit(tmp_path, model, cb, max_steps=2, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    assert cb.columns[-1] == "scaler_skipped"
    scale = 2.0**16  # finite gradients: the scale stays put for 2000 steps
    for seen in model.seen:
        for layer, record in by_step(cb.history)[seen["step"]].items():
            want = expected_stats(seen["grads"][layer] / scale)
            assert seen["grads"][layer].abs().max() > 100 * record["max_abs"]  # really scaled
            for stat in ("mean_abs", "l2", "max_abs"):
                assert record[stat] == pytest.approx(want[stat], rel=1e-5)
            assert record["scaler_skipped"] == 0


@pytest.mark.gpu
def test_fp16_fused_adam_matches_fp32_on_a_gpu(tmp_path: Path) -> None:
    runs = {}
    for precision in ("32-true", "16-mixed"):
        torch.manual_seed(24)
        cb = GradientFlow(every_n_steps=1, plot=False)
        fit(tmp_path, FusedAdam(TinyNet()), cb, max_steps=1, accelerator="gpu", precision=precision)
        runs[precision] = cb.history
    for fp32, fp16 in zip(runs["32-true"], runs["16-mixed"], strict=True):
        for stat in ("mean_abs", "l2", "max_abs"):
            assert fp16[stat] == pytest.approx(fp32[stat], rel=1e-2), (fp32["layer"], stat)


# --------------------------------------------------------------------------- state


def test_state_dict_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(25)
    cb = GradientFlow(every_n_steps=1, plot=False, warmup_steps=0)
    with pytest.warns(GradientFlowWarning):
        fit(tmp_path, Classifier(Chain(1e-6), lr=0.0), cb, max_steps=2)
    state = cb.state_dict()
    copy = GradientFlow(every_n_steps=1, plot=False)
    copy.load_state_dict(torch.load(_saved(tmp_path, state), weights_only=False))
    assert copy.state_dict() == state
    assert copy.history == cb.history
    assert copy.last_step == 1
    assert copy.diagnosis.warned_vanishing
    assert copy.main_path == cb.main_path == [f"net.layers.{i}.weight" for i in range(4)]


def test_two_callbacks_writing_different_files_keep_separate_state() -> None:
    gradients = GradientFlow(plot=False)
    activations = GradientFlow(plot=False, activations=True, filename="activations.csv")
    assert gradients.state_key != activations.state_key
    assert gradients.state_key == GradientFlow(plot=False).state_key  # stable across runs
    assert "activation_diagnosis" in gradients.state_dict()


def _saved(tmp_path: Path, state: dict) -> Path:
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path


def test_resume_keeps_warnings_and_continues_the_csv(tmp_path: Path) -> None:
    torch.manual_seed(26)
    model = Classifier(Chain(1e-6), lr=0.0)
    first = GradientFlow(every_n_steps=1, plot=False, warmup_steps=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    logger = CSVLogger(tmp_path, name="run", version="same")
    with pytest.warns(GradientFlowWarning, match="Gradients vanish at step 0"):
        fit(
            tmp_path,
            model,
            first,
            logger=logger,
            callbacks=[first, ckpt],
            enable_checkpointing=True,
        )
    data = DataLoader(make_data(), batch_size=4)
    # rows an attempt killed after the checkpoint wrote: logged again on resume, never twice
    rows = first.csv_path.read_text().splitlines()
    stale = [row.replace("1,", "2,", 1) for row in rows if row.startswith("1,")]
    first.csv_path.write_text("\n".join([*rows, *stale]) + "\n")

    # same log directory: the CSV goes on; the vanishing warning is not repeated
    same = GradientFlow(every_n_steps=1, plot=False, warmup_steps=0)
    t = pl.Trainer(
        max_epochs=2,
        logger=CSVLogger(tmp_path, name="run", version="same"),
        callbacks=[same],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientFlowWarning)
        t.fit(model, data, ckpt_path=ckpt.last_model_path)
    assert same.csv_path == first.csv_path
    assert [r["step"] for r in read_history(same.csv_path)] == [
        s for s in range(4) for _ in range(4)
    ]

    # a new log directory: a new CSV, whose steps continue
    moved = GradientFlow(every_n_steps=1, plot=False, warmup_steps=0)
    t = pl.Trainer(
        max_epochs=2,
        logger=CSVLogger(tmp_path, name="run", version="moved"),
        callbacks=[moved],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientFlowWarning)
        t.fit(model, data, ckpt_path=ckpt.last_model_path)
    assert moved.csv_path != first.csv_path
    assert sorted({r["step"] for r in read_history(moved.csv_path)}) == [2, 3]


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


# --------------------------------------------------------------------------- histograms


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


def test_zoo_googlenet_output_end_is_the_main_head_and_vit_starts_at_patches() -> None:
    """One watched batch of the real models (what the callback does on its first batch)."""
    pytest.importorskip("timm")
    from gradtrace.measure import parameter_names, select_layers
    from gradtrace.measure.order import LayerOrder
    from gradtrace.models import AuxLogits, create_model

    for arch, kwargs in (("googlenet", {"stem": "cifar"}), ("vit_tiny_cifar", {})):
        torch.manual_seed(28)
        root = nn.Module()
        root.net = create_model(arch, num_classes=10, **kwargs)
        order = LayerOrder()
        order.start(parameter_names(root), keep=False)
        order.watch(root)
        out = root.net(torch.randn(2, 3, 32, 32))
        y = torch.tensor([1, 2])
        if isinstance(out, AuxLogits):
            aux_loss = sum(F.cross_entropy(logits, y) for logits in out.aux)
            loss = F.cross_entropy(out.logits, y) + 0.3 * aux_loss
        else:
            loss = F.cross_entropy(out, y)
        order.backward(loss)
        order.end_watch()
        selected = {layer.name for layer in select_layers(root)}
        layers = [n for n in order.order if n in selected]
        main = [n for n in layers if n in order.main_path]
        if arch == "googlenet":
            aux = [n for n in layers if n.startswith("net.aux")]
            assert aux  # measured ...
            assert not set(aux) & set(main)  # ... but off the main path
            assert main[-1] == "net.fc.weight"
            assert main[0] == layers[0]
        else:
            assert layers[0] == main[0] == "net.patch_embed.proj.weight"
            assert main[-1] == "net.head.weight"
