"""The fast path keeps the numbers: channels_last, torch.compile and bf16 autocast leave the
GradientFlow measurements within floating-point tolerance, and a training step issues no host
syncs from gradtrace's code.

Tolerances. fp32 changes of memory layout or of fused kernels only reorder sums: observed
relative differences are ~1e-6, the tests allow 1e-4. bf16 keeps 8 significant bits (unit
round-off 2^-9 = 0.2%), and the errors of a few layers forward and backward add up: observed
up to ~2% on a network without BatchNorm, the test allows 10% (the vanishing-gradient reading
works in orders of magnitude). With BatchNorm, bf16 differences grow further (its backward
subtracts nearly equal terms), so the bf16 test uses the plain network.

The network is smooth (tanh): at a (leaky) ReLU's kink a last-bit difference in an input
near zero switches the slope, and a layer's max |grad| can move by 1e-4 relative for that
reason alone. The optimizer is SGD: Adam divides by the gradient's running RMS, so two runs
whose gradients differ in the last bit take visibly different steps on near-zero entries, and
the comparison after the first step would measure Adam, not the fast path.
"""

from __future__ import annotations

import csv
import inspect
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from gradtrace.classifier import ImageClassifier
from gradtrace.data.datamodule import ImageDataModule
from gradtrace.gradient_flow import GradientFlow
from gradtrace.models import create_model
from helpers.host_syncs import HostSyncCounter, copy_direction

STATS = ("mean_abs", "l2", "max_abs")


def small_dm() -> ImageDataModule:
    return ImageDataModule(
        "synthetic", num_classes=10, synthetic_sizes=(200, 20), val_size=20, batch_size=16
    )


def gradient_flow(
    root: Path,
    *,
    batch_norm: bool,
    precision: str = "32-true",
    accelerator: str = "cpu",
    steps: int = 3,
    **model_kwargs: Any,
) -> list[dict[str, Any]]:
    """GradientFlow's records of ``steps`` steps of a small VGG, from the same initial weights."""
    torch.manual_seed(0)
    model = ImageClassifier(
        "coursework_vgg",
        num_classes=10,
        batch_norm=batch_norm,
        activation="tanh",
        arch_kwargs={"width": 8},
        optimizer="sgd",
        lr=0.01,
        **model_kwargs,
    )
    flow = GradientFlow(every_n_steps=1, plot=False)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[flow],
        default_root_dir=root,
    )
    trainer.fit(model, small_dm())
    return flow.history


def assert_same_flow(
    reference: list[dict[str, Any]], other: list[dict[str, Any]], rtol: float
) -> None:
    assert [(r["step"], r["layer"]) for r in other] == [(r["step"], r["layer"]) for r in reference]
    layers = {r["layer"] for r in reference}
    # GradientFlow's default layers: the weights of the network's convolutions and linears
    net = create_model("coursework_vgg", num_classes=10, width=8)
    weights = {
        f"net.{name}.weight"
        for name, module in net.named_modules()
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear)
    }
    assert layers == weights
    assert len(reference) == 3 * len(layers)  # every layer at every step
    for ref, got in zip(reference, other):
        for stat in STATS:
            assert got[stat] == pytest.approx(ref[stat], rel=rtol), (ref["step"], ref["layer"])


@pytest.mark.parametrize("batch_norm", [False, True])
def test_channels_last_keeps_the_gradient_flow(tmp_path: Path, batch_norm: bool) -> None:
    contiguous = gradient_flow(tmp_path / "a", batch_norm=batch_norm, channels_last=False)
    fast = gradient_flow(tmp_path / "b", batch_norm=batch_norm, channels_last=True)
    assert_same_flow(contiguous, fast, rtol=1e-4)


def test_bf16_autocast_keeps_the_gradient_flow_within_bf16_precision(tmp_path: Path) -> None:
    fp32 = gradient_flow(tmp_path / "a", batch_norm=False)
    bf16 = gradient_flow(tmp_path / "b", batch_norm=False, precision="bf16-mixed")
    assert_same_flow(fp32, bf16, rtol=0.1)
    # and not identical: autocast did run in bf16
    assert any(a["l2"] != b["l2"] for a, b in zip(fp32, bf16))


@pytest.mark.slow  # inductor compiles C++ kernels: tens of seconds on two cores
def test_compile_keeps_the_gradient_flow(tmp_path: Path) -> None:
    eager = gradient_flow(tmp_path / "a", batch_norm=True)
    compiled = gradient_flow(tmp_path / "b", batch_norm=True, compile=True)
    assert_same_flow(eager, compiled, rtol=1e-4)


@pytest.mark.gpu
def test_fast_path_keeps_the_gradient_flow_on_a_gpu(tmp_path: Path) -> None:
    # fp32 runs in true fp32: ImageClassifier(tf32=False), the default, keeps TF32 off
    run = {"accelerator": "cuda", "batch_norm": True}
    reference = gradient_flow(tmp_path / "ref", channels_last=False, **run)
    assert_same_flow(reference, gradient_flow(tmp_path / "cl", channels_last=True, **run), 1e-4)
    compiled = gradient_flow(tmp_path / "compile", compile=True, **run)
    assert_same_flow(reference, compiled, 1e-4)
    plain = {"accelerator": "cuda", "batch_norm": False}
    fp32 = gradient_flow(tmp_path / "fp32", **plain)
    bf16 = gradient_flow(tmp_path / "bf16", precision="bf16-mixed", compile=True, **plain)
    assert_same_flow(fp32, bf16, rtol=0.1)


# ---------------------------------------------------------------------------------------------
# host syncs and per-step logging


def count_syncs(root: Path, accelerator: str, log_every: int, steps: int = 7) -> dict[str, int]:
    """Host syncs of steps 2..steps-2, by their source: past the first steps' set-up, and
    before the fit's last step, which GradientFlow always measures (on a GPU, its one copy of
    the measured table to the host would count there)."""
    counter = HostSyncCounter(device_only=accelerator != "cpu")

    class Window(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            counter.active = 2 <= trainer.global_step < steps - 1

        def on_train_epoch_end(self, *args: Any) -> None:
            counter.active = False

    model = ImageClassifier("coursework_vgg", num_classes=10, arch_kwargs={"width": 8})
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        log_every_n_steps=log_every,
        logger=pl.loggers.CSVLogger(root),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Window(), GradientFlow(every_n_steps=log_every, plot=False)],
        default_root_dir=root,
    )
    with counter:
        trainer.fit(model, small_dm())
    return dict(counter.counts)


def from_gradtrace(counts: dict[str, int]) -> dict[str, int]:
    return {source: n for source, n in counts.items() if " from gradtrace/" in source}


def without_lines(counts: dict[str, int]) -> dict[str, int]:
    return {re.sub(r":\d+ \(", " (", source): n for source, n in counts.items()}


# What a steady training step reads back on the CPU, none of it from gradtrace: Adam reading
# its step counters (CPU tensors: no device wait; 17 parameters of this VGG) and torchmetrics'
# one_hot range check (CPU only), over 4 counted steps.
ADAM = (
    "aten._local_scalar_dense in torch/optim/optimizer.py (_get_value) "
    "from lightning/pytorch/plugins/precision/precision.py (optimizer_step)"
)
ONE_HOT = (
    "aten._local_scalar_dense "
    "from torchmetrics/functional/classification/stat_scores.py (_multiclass_stat_scores_update)"
)


def test_no_host_syncs_from_gradtrace_on_unlogged_steps(tmp_path: Path) -> None:
    counts = without_lines(count_syncs(tmp_path, "cpu", log_every=50))
    assert counts == {ADAM: 17 * 4, ONE_HOT: 2 * 4}


def test_logged_steps_read_back_only_what_they_log(tmp_path: Path) -> None:
    counts = without_lines(count_syncs(tmp_path, "cpu", log_every=1))
    # Lightning reads back what is logged through self.log for the loggers on a logged step:
    # the step loss (train/loss_step). GradientFlow's summary scalars reach the loggers from
    # its one copy per logged step (a .cpu() of a CPU tensor here: not an op, so not seen);
    # its self.log of them (for callbacks and the progress bar) skips the loggers.
    to_item = "aten._local_scalar_dense from lightning/fabric/utilities/apply_func.py (to_item)"
    assert counts == {ADAM: 17 * 4, ONE_HOT: 2 * 4, to_item: 1 * 4}


@pytest.mark.gpu
def test_no_host_syncs_from_gradtrace_on_unlogged_gpu_steps(tmp_path: Path) -> None:
    # the unlogged steps of the CPU twin above: no step of the window is measured
    assert from_gradtrace(count_syncs(tmp_path, "cuda", log_every=50)) == {}


class CountLogCalls(ImageClassifier):
    """Records the keys of self.log calls made inside training steps."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_logs: list[list[str]] = []
        self._in_step = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.step_logs.append([])
        self._in_step = True
        try:
            return super().training_step(batch, batch_idx)
        finally:
            self._in_step = False

    def log(self, name: str, *args: Any, **kwargs: Any) -> None:
        if self._in_step:
            self.step_logs[-1].append(name)
        super().log(name, *args, **kwargs)


def test_training_steps_log_only_the_step_loss_and_only_when_it_is_written(
    tmp_path: Path,
) -> None:
    model = CountLogCalls("coursework_vgg", num_classes=10, arch_kwargs={"width": 4})
    logger = pl.loggers.CSVLogger(tmp_path)
    captured: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    class Capture(pl.Callback):  # the logits and labels of every training batch
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, i: int):
            x, y = batch
            with torch.no_grad():
                captured.append((trainer.current_epoch, pl_module(x), y))

    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=5,
        limit_val_batches=0,
        log_every_n_steps=2,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Capture()],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, small_dm())
    # self.log in a training step only for the step loss, on the steps Lightning writes
    # (every 2nd: global steps 1, 3, 5, ...); the epoch loss and accuracies at the epoch's end
    assert model.step_logs == [["train/loss_step"] if i % 2 else [] for i in range(10)]
    # the loss and accuracy of each epoch, from that epoch's batches only (the metrics reset)
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for epoch in (0, 1):
        logits = torch.cat([out for e, out, _ in captured if e == epoch])
        labels = torch.cat([y for e, _, y in captured if e == epoch])
        accuracy = (logits.argmax(1) == labels).float().mean().item()
        loss = torch.nn.functional.cross_entropy(logits, labels).item()  # mean over images
        [row] = [r for r in rows if r["train/acc"] and int(r["epoch"]) == epoch]
        assert float(row["train/acc"]) == pytest.approx(accuracy)
        assert float(row["train/loss"]) == pytest.approx(loss, rel=1e-5)


def test_host_sync_counter_attributes_scalar_reads_to_their_caller() -> None:
    x = torch.arange(6.0)
    counter = HostSyncCounter()
    with counter:
        x.sum().item()  # not counted: inactive
        counter.active = True
        line = inspect.currentframe().f_lineno
        x.sum().item()
        bool(x.max() > 2)
        torch.nonzero(x)
        x * 2  # no sync
        counter.active = False
    where = f"{__file__}:{{}} (test_host_sync_counter_attributes_scalar_reads_to_their_caller)"
    assert dict(counter.counts) == {
        "aten._local_scalar_dense from " + where.format(line + 1): 1,  # .item()
        "aten._local_scalar_dense from " + where.format(line + 2): 1,  # bool(tensor)
        "aten.nonzero from " + where.format(line + 3): 1,
    }


def test_copies_that_wait_are_told_apart_without_a_gpu() -> None:
    aten = torch.ops.aten
    cpu, gpu = (
        SimpleNamespace(device=torch.device("cpu")),
        SimpleNamespace(device=torch.device("cuda")),
    )
    to_cuda, to_cpu = {"device": torch.device("cuda")}, {"device": torch.device("cpu")}
    assert copy_direction(aten._to_copy.default, (gpu,), to_cpu) == "device-to-host copy"
    assert copy_direction(aten._to_copy.default, (cpu,), to_cuda) == "blocking host-to-device copy"
    assert copy_direction(aten._to_copy.default, (cpu,), {**to_cuda, "non_blocking": True}) is None
    assert copy_direction(aten._to_copy.default, (cpu,), {"dtype": torch.half}) is None
    assert copy_direction(aten.copy_.default, (cpu, gpu), {}) == "device-to-host copy"
    assert copy_direction(aten.copy_.default, (gpu, cpu, True), {}) is None
    assert copy_direction(aten.copy_.default, (gpu, cpu), {}) == "blocking host-to-device copy"
    assert copy_direction(aten.add.Tensor, (cpu, cpu), {}) is None
