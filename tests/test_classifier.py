"""ImageClassifier: model building, losses, metrics, optimisers, schedules, checkpoints."""

from __future__ import annotations

import math
from collections.abc import Iterator

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from gradtrace.classifier import ImageClassifier
from gradtrace.models import AuxLogits


def loaders(n: int = 64, classes: int = 10, batch: int = 16) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    # Learnable: the class shifts the mean of one channel.
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5 + y.view(-1, 1, 1, 1) / classes
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch, shuffle=False), DataLoader(ds, batch_size=batch)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def test_flat_knobs_reach_the_model() -> None:
    module = ImageClassifier(arch="coursework_vgg", depth=38, batch_norm=True, residual=True)
    assert sum(p.numel() for p in module.net.parameters()) == 338_500
    assert module.net.stages[0].blocks[0].residual is True
    shortcut = ImageClassifier(
        arch="vgg38", residual=True, arch_kwargs={"downsample_shortcut": "avgpool"}
    )
    assert shortcut.net.stages[0].reduction.shortcut is not None


def test_knob_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\['depth'\] given both as arguments and in arch_kwargs"):
        ImageClassifier(arch="coursework_vgg", depth=8, arch_kwargs={"depth": 14})


def test_knob_the_model_lacks_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'vgg38' fixes \{'depth': 38\}"):
        ImageClassifier(arch="vgg38", depth=8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "rmsprop"}, "optimizer must be one of adam, adamw, sgd; got 'rmsprop'"),
        ({"scheduler": "linear"}, "scheduler must be one of cosine, warmup_cosine, multistep"),
        ({"lr": 0.0}, r"lr must be in \(0, inf\); got 0.0"),
        ({"lr": 1e-3, "lr_min": 1e-3}, r"lr_min must be in \[0, 0.001\); got 0.001"),
        ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\); got 1.0"),
        ({"milestones": (0.75, 0.5)}, "milestones must be increasing fractions"),
        ({"arch": "vgg39"}, "unknown model 'vgg39'; closest: vgg38"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageClassifier(**kwargs)


def test_hyperparameters_round_trip_through_a_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    module = ImageClassifier(arch="vgg08", num_classes=10, batch_norm=True, lr=3e-3)
    train, val = loaders()
    t = trainer(tmp_path, max_steps=2, limit_val_batches=1)
    t.fit(module, train, val)
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    restored = ImageClassifier.load_from_checkpoint(path)
    assert restored.hparams.lr == 3e-3
    assert restored.hparams.batch_norm is True
    x = torch.randn(4, 3, 32, 32)
    module.eval(), restored.eval()
    torch.testing.assert_close(restored(x), module(x))


def test_metrics_are_logged_per_stage(tmp_path) -> None:
    torch.manual_seed(0)
    module = ImageClassifier(arch="vgg08", num_classes=10)
    train, val = loaders()
    t = trainer(tmp_path, max_epochs=1)
    t.fit(module, train, val)
    logged = set(t.logged_metrics)
    assert {"train/loss", "train/acc", "train/acc5", "val/loss", "val/acc", "val/acc5"} <= logged
    results = t.test(module, val, verbose=False)[0]
    # Independent computation of the test metrics on the same data.
    module.eval()
    with torch.no_grad():
        x, y = val.dataset.tensors
        logits = module(x)
    assert results["test/loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-4)
    assert results["test/acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    top5 = logits.topk(5, dim=1).indices.eq(y[:, None]).any(1).float().mean().item()
    assert results["test/acc5"] == pytest.approx(top5)


class AuxNet(torch.nn.Module):
    """Returns auxiliary logits in training mode, like GoogLeNet."""

    def __init__(self) -> None:
        super().__init__()
        self.main = torch.nn.Linear(12, 5)
        self.aux1 = torch.nn.Linear(12, 5)
        self.aux2 = torch.nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor | AuxLogits:
        x = x.flatten(1)
        if self.training:
            return AuxLogits(self.main(x), (self.aux1(x), self.aux2(x)))
        return self.main(x)


def test_auxiliary_losses_weigh_0_3_in_training_only(tmp_path) -> None:
    module = ImageClassifier(arch="vgg08", num_classes=5, channels_last=False)
    module.net = AuxNet()
    x, y = torch.randn(8, 3, 2, 2), torch.arange(8) % 5
    net = module.net
    main, aux1, aux2 = (
        F.cross_entropy(head(x.flatten(1)), y) for head in (net.main, net.aux1, net.aux2)
    )
    batch = DataLoader(TensorDataset(x, y), batch_size=8)
    # validation (eval mode): the main head's loss only, as logged for the one batch
    results = trainer(tmp_path).validate(module, batch, verbose=False)[0]
    assert results["val/loss"] == pytest.approx(main.item(), rel=1e-6)
    # training: the loss of the first step (before any update) as logged
    t = trainer(tmp_path, max_steps=1, log_every_n_steps=1)
    t.fit(module, batch)
    torch.testing.assert_close(t.callback_metrics["train/loss_step"], main + 0.3 * (aux1 + aux2))
    module.eval()
    assert module(x).shape == (8, 5)


def lr_trajectory(tmp_path, steps: int, **kwargs) -> list[float]:
    module = ImageClassifier(arch="vgg08", num_classes=10, lr=0.1, **kwargs)
    lrs: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    train, _ = loaders(n=steps * 4, batch=4)
    trainer(tmp_path, max_epochs=1, callbacks=[Record()], limit_val_batches=0).fit(module, train)
    return lrs


def test_cosine_schedule_spans_the_run(tmp_path) -> None:
    lrs = lr_trajectory(tmp_path, steps=10, scheduler="cosine")
    expected = [0.05 * (1 + math.cos(math.pi * t / 10)) for t in range(10)]
    assert lrs == pytest.approx(expected)


def test_cosine_schedule_anneals_to_its_floor(tmp_path) -> None:
    # The original coursework code: CosineAnnealingLR(eta_min=2e-5).
    lrs = lr_trajectory(tmp_path, steps=10, scheduler="cosine", lr_min=0.02)
    expected = [0.02 + 0.04 * (1 + math.cos(math.pi * t / 10)) for t in range(10)]
    assert lrs == pytest.approx(expected)


def test_warmup_cosine_and_multistep(tmp_path) -> None:
    warm = lr_trajectory(tmp_path, steps=20, scheduler="warmup_cosine", warmup_fraction=0.1)
    assert warm[0] == pytest.approx(0.05)
    assert warm[2] == pytest.approx(0.1)
    assert warm[-1] < warm[2]
    multi = lr_trajectory(tmp_path, steps=8, scheduler="multistep", gamma=0.5)
    assert multi == pytest.approx([0.1] * 4 + [0.05] * 2 + [0.025] * 2)


def test_sgd_options_reach_the_optimizer() -> None:
    module = ImageClassifier(
        arch="vgg08", optimizer="sgd", lr=0.01, nesterov=True, scheduler="none"
    )
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["nesterov"] is True
    assert optimizer.defaults["momentum"] == 0.9


def test_channels_last_does_not_change_the_logits() -> None:
    torch.manual_seed(0)
    fast = ImageClassifier(arch="vgg08", batch_norm=True).eval()
    plain = ImageClassifier(arch="vgg08", batch_norm=True, channels_last=False).eval()
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(4, 3, 32, 32)
    assert fast.net.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# TF32


def tf32_state() -> list[object]:
    """The TF32 settings as every reader sees them: the legacy flags (``"unreadable"`` when
    set through the per-operator API) and, on torch >= 2.9, the per-operator precisions."""
    backends = torch.backends
    state: list[object] = []
    for owner in (backends.cuda.matmul, backends.cudnn):
        try:
            state.append(owner.allow_tf32)
        except RuntimeError:
            state.append("unreadable")
    if hasattr(backends.cudnn, "conv"):
        switches = (backends.cuda.matmul, backends.cudnn.conv, backends.cudnn.rnn)
        state += [switch.fp32_precision for switch in switches]
    return state


@pytest.fixture
def tf32_put_back() -> Iterator[None]:
    """The test's TF32 settings undone: the legacy flags, then the per-operator precisions
    (monkeypatch cannot: cuda.matmul's flag is no attribute it can put back)."""
    backends = torch.backends
    matmul, cudnn = backends.cuda.matmul, backends.cudnn
    flags = matmul.allow_tf32, cudnn.allow_tf32
    switches = (matmul, cudnn.conv, cudnn.rnn) if hasattr(cudnn, "conv") else ()
    precisions = [switch.fp32_precision for switch in switches]
    yield
    matmul.allow_tf32, cudnn.allow_tf32 = flags
    for switch, precision in zip(switches, precisions):
        switch.fp32_precision = precision


class RecordTF32(pl.Callback):
    """The legacy TF32 flags at each training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool]] = []

    def on_train_batch_start(self, *args: object) -> None:
        self.seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))


def small_vgg(**kwargs: object) -> ImageClassifier:
    return ImageClassifier("coursework_vgg", num_classes=10, arch_kwargs={"width": 4}, **kwargs)


@pytest.mark.usefixtures("tf32_put_back")
@pytest.mark.parametrize("tf32", [False, True])
def test_tf32_setting_holds_during_the_fit_and_is_put_back_after(tmp_path, tf32: bool) -> None:
    # the process starts with the opposite setting
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    before = tf32_state()
    module, record = small_vgg(tf32=tf32), RecordTF32()
    train, val = loaders()
    t = trainer(tmp_path, max_steps=2, limit_val_batches=1, callbacks=[record])
    t.fit(module, train, val)
    assert record.seen == [(tf32, tf32)] * 2
    assert tf32_state() == before
    assert module.hparams.tf32 is tf32


@pytest.mark.usefixtures("tf32_put_back")
def test_tf32_setting_is_put_back_when_the_fit_fails(tmp_path) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    before = tf32_state()

    class Failing(ImageClassifier):
        def training_step(self, batch, batch_idx):
            assert torch.backends.cudnn.allow_tf32 is False  # TF32 off by default
            raise RuntimeError("a failing step")

    module = Failing("coursework_vgg", num_classes=10, arch_kwargs={"width": 4})
    with pytest.raises(RuntimeError, match="a failing step"):
        trainer(tmp_path, max_steps=1).fit(module, loaders()[0])
    assert tf32_state() == before


@pytest.mark.skipif(
    not hasattr(torch.backends.cudnn, "conv"), reason="the per-operator API: torch >= 2.9"
)
@pytest.mark.usefixtures("tf32_put_back")
def test_tf32_set_through_the_per_operator_api_is_put_back(tmp_path) -> None:
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    before = tf32_state()
    assert before[1] == "unreadable"  # the legacy cuDNN flag cannot say what was set
    record = RecordTF32()
    trainer(tmp_path, max_steps=1, callbacks=[record]).fit(small_vgg(tf32=True), loaders()[0])
    assert record.seen == [(True, True)]
    assert tf32_state() == before


def test_table1_configs_resolve_with_tf32_off(capsys) -> None:
    import yaml

    from gradtrace.cli.configs import list_configs
    from gradtrace.cli.trainer_cli import GradtraceCLI

    for name in [n for n in list_configs() if n.startswith("table1/")]:
        with pytest.raises(SystemExit):
            GradtraceCLI(args=["--config", name, "--print_config"], run=False)
        assert yaml.safe_load(capsys.readouterr().out)["model"]["tf32"] is False, name
    with pytest.raises(SystemExit):
        GradtraceCLI(
            args=["--config", "table1/vgg08", "--model.tf32=true", "--print_config"], run=False
        )
    assert yaml.safe_load(capsys.readouterr().out)["model"]["tf32"] is True
