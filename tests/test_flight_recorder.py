"""The flight recorder, ``GradientFlow(flight_recorder=K)`` (docs/instruments.md): spikes
injected into models it was not written around are named at the right step, layer and side;
its CSV holds the norms an independent computation gives; a healthy run writes nothing and
its steps read nothing back from the device; a non-finite loss is reported once."""

from __future__ import annotations

import csv
import json
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradtrace import GradientFlow
from gradtrace.measure.departures import first_departure, robust_z
from gradtrace.measure.flight_recorder import ACTIVATION_SHARE
from helpers.distributed import SCRIPTS, run_rank_script
from helpers.fits import quiet_trainer
from helpers.host_syncs import HostSyncCounter

FLIGHT_FILES = ("gradtrace/measure/flight_recorder.py", "gradtrace/gradient_flow/flight.py")


class TextEncoder(pl.LightningModule):
    """Tokens -> embedding -> one Transformer encoder layer -> mean -> linear head (Adam)."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        tokens, labels = batch
        return F.cross_entropy(self.head(self.encoder(self.embed(tokens)).mean(1)), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class MLP(pl.LightningModule):
    """Three linear layers with ReLUs (Adam); ``loss_factor`` multiplies the loss."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
        )
        self.lr = lr
        self.loss_factor = 1.0

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        return F.cross_entropy(self.net(x), y) * self.loss_factor

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def tokens(n: int = 1024) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 16, (n, 8), generator=g)
    return TensorDataset(x, x[:, 0] % 3)


def features(n: int = 1024) -> TensorDataset:
    """Three classes from the signs of two inputs, a fifth of the labels random (the loss
    stays well above zero, as a real task's does)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    noisy = torch.rand(n, generator=g) < 0.2
    return TensorDataset(x, torch.where(noisy, torch.randint(0, 3, (n,), generator=g), y))


class At(pl.Callback):
    """Calls ``start(trainer, pl_module)`` before step ``step``'s batch, ``end`` after it."""

    def __init__(
        self,
        step: int,
        start: Callable[[pl.Trainer, pl.LightningModule], None],
        end: Callable[[pl.Trainer, pl.LightningModule], None] | None = None,
    ) -> None:
        self.step, self.start, self.end = step, start, end

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.start(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == self.step + 1 and self.end is not None:
            self.end(trainer, pl_module)


def scale_lr(factor: float) -> Callable[[pl.Trainer, pl.LightningModule], None]:
    def scale(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for group in trainer.optimizers[0].param_groups:
            group["lr"] *= factor

    return scale


class Norms(pl.Callback):
    """Each step's gradient L2 (before the optimizer step), update L2 (over it) and output
    RMS (over the first 1/32 of the batch, at least 2 samples) of some layers, computed here
    independently of the recorder."""

    def __init__(self, modules: dict[str, str]) -> None:
        self.modules = modules  # layer name -> name of the module whose output it is
        self.values: dict[tuple[int, str], list[float]] = {}
        self._before: dict[str, torch.Tensor] = {}
        self._squares: dict[str, list[float]] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        named = dict(pl_module.named_modules())
        for layer, module in self.modules.items():
            hook = self._counting(layer)
            named[module].register_forward_hook(hook)

    def _counting(self, layer: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if torch.is_grad_enabled():  # the recorder reads the first 1/32 of the batch
                share = out.detach()[: max(math.ceil(len(out) / ACTIVATION_SHARE), 2)]
                sums = self._squares.setdefault(layer, [0.0, 0.0])
                sums[0] += float(share.double().square().sum())
                sums[1] += share.numel()

        return hook

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any):
        params = dict(pl_module.named_parameters())
        for layer in self.modules:
            grad = float(params[layer].grad.double().norm())
            self.values[trainer.global_step, layer] = [grad]
            self._before[layer] = params[layer].detach().clone()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        params = dict(pl_module.named_parameters())
        for layer in self.modules:
            step = trainer.global_step - 1  # the step that just ended
            update = float((params[layer].detach() - self._before[layer]).double().norm())
            squares, count = self._squares.pop(layer)
            self.values[step, layer] += [update, math.sqrt(squares / count)]


def fit(
    root: Path,
    model: Callable[[], pl.LightningModule],
    data: TensorDataset,
    steps: int,
    callbacks: list[pl.Callback],
    flight_recorder: int = 20,
    plot: bool = False,
    **options: Any,
) -> tuple[GradientFlow, list[str]]:
    """Train ``model()`` (made from seed 0) for ``steps`` steps of batch 16 with
    GradientFlow(flight_recorder=...) first among ``callbacks``; return it and the flight
    recorder's warnings; ``options`` go to the Trainer."""
    torch.manual_seed(0)
    flow = GradientFlow(flight_recorder=flight_recorder, plot=plot, every_n_steps=10**6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(root, [flow, *callbacks], max_steps=steps, **options)
        trainer.fit(model(), DataLoader(data, batch_size=16))
    said = [str(w.message) for w in caught if "flight recorder" in str(w.message)]
    return flow, said


def read_rows(path: Path) -> dict[tuple[int, str], dict[str, str]]:
    with open(path, newline="") as f:
        return {(int(r["step"]), r["layer"]): r for r in csv.DictReader(f)}


def test_a_learning_rate_times_1000_is_named_as_that_steps_update(tmp_path: Path) -> None:
    norms = Norms({"encoder.layers.0.linear1.weight": "encoder.layers.0.linear1"})
    lr_burst = At(24, scale_lr(1000.0), scale_lr(1e-3))
    flow, said = fit(tmp_path, TextEncoder, tokens(), 32, [lr_burst, norms], plot=True)
    [spike] = flow.spikes
    # the update of step 24 is the first to depart (all layers' Adam steps are 1000 times
    # longer; the input end first), and the loss spikes at the next step's forward pass
    assert (spike.step, spike.departure_step, spike.side) == (25, 24, "update")
    assert spike.layer == "embed.weight"
    assert 300 < spike.factor < 3000
    assert spike.path == tmp_path / "gradient_flow" / "spike_25.csv"
    assert spike.path.with_suffix(".png").is_file()
    [message] = said
    assert "the loss spiked at step 25" in message
    assert "the update of embed.weight at step 24" in message
    rows = read_rows(spike.path)
    assert [layer for step, layer in rows if step == 25] == flow.layer_order
    assert float(rows[25, "head.weight"]["loss"]) > 2 * float(rows[23, "head.weight"]["loss"])
    checked = 0
    for (step, layer), (grad, update, act) in norms.values.items():
        if (step, layer) in rows:
            row = rows[step, layer]
            assert float(row["grad_l2"]) == pytest.approx(grad, rel=1e-5)
            assert float(row["update_l2"]) == pytest.approx(update, rel=1e-5)
            assert float(row["act_rms"]) == pytest.approx(act, rel=1e-5)
            checked += 1
    assert checked == 20  # every step the ring holds


def test_a_layers_scaled_weights_are_named_as_its_activation(tmp_path: Path) -> None:
    def scale_weights(trainer: pl.Trainer, pl_module: Any) -> None:
        with torch.no_grad():
            pl_module.net[2].weight.mul_(100.0)

    flow, said = fit(tmp_path, MLP, features(), 30, [At(24, scale_weights)])
    [spike] = flow.spikes
    assert (spike.step, spike.departure_step) == (24, 24)
    assert (spike.side, spike.layer) == ("activation", "net.2.weight")
    assert 30 < spike.factor < 300
    assert len(said) == 1


def test_a_non_finite_loss_is_reported_once(tmp_path: Path) -> None:
    def poison(trainer: pl.Trainer, pl_module: Any) -> None:
        pl_module.loss_factor = math.nan  # and nan from here on: weights, gradients, loss

    flow, said = fit(tmp_path, MLP, features(), 40, [At(22, poison)])
    [spike] = flow.spikes
    assert spike.step == 22
    assert math.isnan(spike.loss)
    assert spike.z == math.inf
    # the loss is nan in the forward pass's last operation: the first value to go non-finite
    # is the gradient at the output end
    assert (spike.departure_step, spike.side, spike.layer) == (22, "gradient", "net.4.weight")
    [message] = said
    assert "the loss went non-finite at step 22" in message
    assert [p.name for p in spike.path.parent.glob("spike_*.csv")] == ["spike_22.csv"]


class MicroBatchLosses(pl.Callback):
    """Each micro-batch's loss, computed here, by the optimizer step it belongs to."""

    def __init__(self) -> None:
        self.losses: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, i: int):
        x, y = batch
        with torch.no_grad():  # the weights its forward pass will use
            loss = F.cross_entropy(pl_module.net(x), y) * pl_module.loss_factor
        self.losses.setdefault(trainer.global_step, []).append(float(loss))


def test_with_gradient_accumulation_a_step_is_its_micro_batches(tmp_path: Path) -> None:
    def poison(trainer: pl.Trainer, pl_module: Any) -> None:
        pl_module.loss_factor = math.nan

    micro = MicroBatchLosses()
    callbacks = [At(22, poison), micro]
    flow, _ = fit(tmp_path, MLP, features(), 30, callbacks, accumulate_grad_batches=2)
    [spike] = flow.spikes
    assert spike.step == 22  # optimizer steps, not batches
    rows = read_rows(spike.path)
    steps = sorted({step for step, _ in rows})
    assert steps == list(range(5, 25))  # the ring's 20 steps, up to the spike's check
    for step in steps:
        # the loss of a step: the mean of its two micro-batches' losses
        assert len(micro.losses[step]) == 2
        want = sum(micro.losses[step]) / 2
        got = float(rows[step, "net.0.weight"]["loss"])
        assert got == pytest.approx(want, rel=1e-6) if step < 22 else math.isnan(got)


def test_a_healthy_run_writes_nothing_and_reads_nothing_back_between_checks(
    tmp_path: Path,
) -> None:
    counter = HostSyncCounter()

    class Window(pl.Callback):  # count on steps that end without a check (every 10th does)
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            counter.active = trainer.global_step % 10 not in (0, 9)

        def on_train_batch_end(self, *args: Any) -> None:
            counter.active = False

    with counter:
        flow, said = fit(tmp_path, MLP, features(4096), 250, [Window()], flight_recorder=40)
    assert flow.spikes == []
    assert said == []
    assert flow.faults == {}
    assert list(tmp_path.rglob("spike_*")) == []
    counts = counter.counts.items()
    assert {where: n for where, n in counts if any(f in where for f in FLIGHT_FILES)} == {}


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ({"flight_recorder": 10}, "flight_recorder must be an integer >= 20 or None; got 10"),
        ({"flight_recorder": 40, "spike_threshold": 0}, "spike_threshold must be in (0, inf)"),
    ],
)
def test_bad_arguments_are_refused(argument: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GradientFlow(**argument)


def test_the_first_departure_is_the_first_in_a_steps_order() -> None:
    # 30 steps x 3 sides x 2 layers of steady values with a little noise
    g = torch.Generator().manual_seed(0)
    norms = 10 ** (0.02 * torch.randn(30, 3, 2, generator=g, dtype=torch.float64))
    norms[25, 0, 0] *= 100  # gradient of layer 0 (the input end) at step 25
    norms[25, 0, 1] *= 100  # gradient of layer 1 (the output end): backward reaches it first
    norms[26, 2, 0] *= 100  # activation of layer 0 a step later
    departure, z = first_departure(norms, 27, [0, 1], 6.0)  # the loss spikes a step later
    assert departure is not None
    assert (departure.row, departure.side, departure.layer) == (25, "gradient", 1)
    assert departure.factor == pytest.approx(100, rel=0.2)
    assert z[25, 0, 1] > 6
    assert math.isnan(z[5, 0, 0])  # under 10 steps of history: none
    assert first_departure(norms, 28, [0, 1], 6.0)[0] is None  # two quiet steps: none
    norms[23, 1, 1] *= 100  # an update that departs with a quiet step after it
    assert first_departure(norms, 27, [0, 1], 6.0)[0] == departure  # is not the cause
    assert robust_z(5.0, [1.0] * 9) is None
    assert robust_z(1.2, [1.0] * 10, floor=0.05) == pytest.approx(4.0)


@pytest.mark.slow
@pytest.mark.integration
def test_two_processes_read_the_ring_as_one_process_does(tmp_path: Path) -> None:
    """DDP and FSDP2 on 2 gloo processes, each on half of every batch: the same spike and the
    same norms as one process on the whole batches; one all_gather per check and one for
    reading the ring."""
    run_rank_script(
        "flight_recorder_distributed.py", lambda port: [str(tmp_path), "--port", str(port)]
    )
    sys.path.insert(0, str(SCRIPTS))
    try:
        import flight_recorder_distributed as script
    finally:
        sys.path.remove(str(SCRIPTS))
    reference = script.single()
    [(row, loss, z)] = reference["spikes"]
    assert row == script.BURST + 1  # the loss after the burst's step
    assert reference["check_collectives"] == [0] * 5
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for setup, got in results.items():
            where = (setup, rank)
            assert got["check_collectives"] == [1] * 5, where
            assert got["norms_collectives"] == 1, where
            assert (got["names"], got["steps"]) == (reference["names"], reference["steps"])
            [(got_row, got_loss, got_z)] = got["spikes"]
            assert got_row == row, where
            assert got_loss == pytest.approx(loss, rel=1e-5), where
            assert got_z == pytest.approx(z, rel=1e-4), where
            assert got["losses"] == pytest.approx(reference["losses"], rel=1e-5), where
            got_norms, norms = torch.tensor(got["norms"]), torch.tensor(reference["norms"])
            assert got_norms.shape == (20, 3, 3)
            # up to float rounding, which the steps after the burst amplify
            through_spike = got["steps"].index(script.BURST + 1) + 1
            for rows, rtol in ((slice(None, through_spike), 1e-5), (slice(None), 1e-3)):
                torch.testing.assert_close(got_norms[rows], norms[rows], rtol=rtol, atol=0.0)
