"""``ImageClassifier``: any zoo model as a LightningModule, trained as in the Table 1 study."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from gradtrace.checks import check_choice, check_range
from gradtrace.compat import attached_trainer, is_compiled_module, should_update_logs
from gradtrace.models import AuxLogits, create_model

__all__ = ["OPTIMIZERS", "SCHEDULERS", "ImageClassifier", "TF32Setting"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine", "warmup_cosine", "multistep", "step", "plateau", "none")
STAGES = ("train", "val", "test")


class ImageClassifier(pl.LightningModule):
    """Image classification with a network from :func:`gradtrace.models.create_model`.

    The common architecture knobs are plain arguments so that sweeps can set them flat
    (``--model.depth 38 --model.batch_norm true``); ``None`` leaves the model's own default.
    Everything else the architecture takes goes in ``arch_kwargs``. All arguments are saved as
    hyperparameters: ``ImageClassifier.load_from_checkpoint(path)`` rebuilds the same network.

    Args:
        arch: registered model name (``gradtrace.models.list_models()``; ``vgg08``/``vgg38``
            are the coursework network, ``vgg11``-``vgg19`` the classic VGG).
        num_classes: classifier outputs; the CLI links it to the data module's class count.
        in_chans: input channels; the CLI links it to the data module's channels.
        depth: weight layers, for the families that take one: ``coursework_vgg`` (8 + 6k:
            8, 14, 20, ..., 38, ...) or ``vgg`` (11, 13, 16, 19); default: the model's.
        batch_norm: ``true`` adds batch normalisation (``norm=batch``); default: the model's.
        residual: ``true`` adds residual connections (coursework VGG, plain/ResNet CIFAR
            nets); default: the model's.
        norm: normalisation layer: ``batch``, ``group``, ``layer`` or ``none``; default: the
            model's.
        activation: ``relu``, ``leaky_relu``, ``elu``, ``selu``, ``sigmoid`` or ``tanh``;
            default: the model's.
        init: weight initialisation: ``pytorch`` (PyTorch's default), ``kaiming`` or
            ``xavier``; default: the model's.
        arch_kwargs: any other model options, e.g. ``{"downsample_shortcut": "avgpool"}``.
        optimizer: ``adam`` (the coursework's), ``adamw`` or ``sgd``.
        lr: learning rate (1e-3 as in the coursework).
        lr_min: the floor the cosine schedules anneal to (``eta_min``; the original coursework
            code: 2e-5); must be below ``lr``.
        weight_decay: L2 penalty (decoupled for AdamW).
        momentum: SGD's momentum (``sgd`` only), in [0, 1).
        nesterov: Nesterov momentum (``sgd`` only).
        scheduler: ``cosine`` annealing over the whole run (default, per step),
            ``warmup_cosine`` (linear warm-up for ``warmup_fraction`` of the steps, then cosine;
            ViT), ``multistep`` (times ``gamma`` at the ``milestones`` fractions of the run;
            ResNet paper), ``step`` (times ``gamma`` every ``step_size`` epochs), ``plateau``
            (times ``gamma`` when ``val/acc`` stalls for ``patience`` epochs; VGG paper), ``none``.
        warmup_fraction: the fraction of the run ``warmup_cosine`` warms up for, in [0, 1).
        milestones: increasing fractions of the run, in (0, 1), where ``multistep``
            multiplies the learning rate by ``gamma``.
        step_size: epochs between ``step``'s multiplications by ``gamma`` (>= 1).
        patience: epochs without a better ``val/acc`` before ``plateau`` multiplies the
            learning rate by ``gamma`` (>= 0).
        gamma: the factor of the ``multistep``, ``step`` and ``plateau`` schedules (> 0).
        label_smoothing: cross-entropy label smoothing.
        aux_weight: weight of auxiliary-head losses (GoogLeNet: 0.3), training only.
        channels_last: run convolutions in NHWC (faster on CPUs and tensor cores).
        compile: ``torch.compile`` the network in place (parameter names unchanged).
        tf32: let fp32 CUDA convolutions and matmuls run in TF32 during each Trainer call
            (faster on Ampere and newer GPUs, ~1e-3 relative error; see :class:`TF32Setting`,
            which the model adds to the Trainer's callbacks). Default ``False``: fp32 means
            fp32, on a GPU as on a CPU (where the setting changes nothing).
    """

    def __init__(
        self,
        arch: str = "vgg08",
        num_classes: int = 100,
        in_chans: int = 3,
        depth: int | None = None,
        batch_norm: bool | None = None,
        residual: bool | None = None,
        norm: str | None = None,
        activation: str | None = None,
        init: str | None = None,
        arch_kwargs: dict[str, Any] | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        lr_min: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        nesterov: bool = False,
        scheduler: str = "cosine",
        warmup_fraction: float = 0.05,
        milestones: tuple[float, ...] = (0.5, 0.75),
        step_size: int = 30,
        patience: int = 10,
        gamma: float = 0.1,
        label_smoothing: float = 0.0,
        aux_weight: float = 0.3,
        channels_last: bool = True,
        compile: bool = False,
        tf32: bool = False,
    ) -> None:
        super().__init__()
        check_choice("optimizer", optimizer, OPTIMIZERS)
        check_choice("scheduler", scheduler, SCHEDULERS)
        check_range("lr", lr, low=0.0, low_inclusive=False)
        check_range("lr_min", lr_min, low=0.0, high=lr, high_inclusive=False)
        check_range("weight_decay", weight_decay, low=0.0)
        check_range("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
        check_range("warmup_fraction", warmup_fraction, low=0.0, high=1.0, high_inclusive=False)
        check_range("gamma", gamma, low=0.0, low_inclusive=False)
        check_range("label_smoothing", label_smoothing, low=0.0, high=1.0, high_inclusive=False)
        check_range("aux_weight", aux_weight, low=0.0)
        if any(not 0.0 < m < 1.0 for m in milestones) or list(milestones) != sorted(milestones):
            raise ValueError(
                f"milestones must be increasing fractions of the run in (0, 1); got {milestones}"
            )
        if step_size < 1 or patience < 0:
            raise ValueError(
                f"step_size must be >= 1 and patience >= 0; got {step_size}, {patience}"
            )
        self.save_hyperparameters()

        knobs = {
            "depth": depth,
            "batch_norm": batch_norm,
            "residual": residual,
            "norm": norm,
            "activation": activation,
            "init": init,
        }
        options = {k: v for k, v in knobs.items() if v is not None}
        overlap = sorted(set(options) & set(arch_kwargs or {}))
        if overlap:
            raise ValueError(
                f"{overlap} given both as arguments and in arch_kwargs; give them once"
            )
        options.update(arch_kwargs or {})
        self._net_options = options
        self.net = create_model(arch, num_classes=num_classes, in_chans=in_chans, **options)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

        # Epoch statistics accumulate on the device (no host syncs: NaN checks off) and are
        # logged once per epoch: a self.log call per step costs host time (Lightning moves its
        # result objects to the device every call) that a fast GPU step cannot hide.
        self.metrics = nn.ModuleDict(
            {f"{stage}_loss": MeanMetric(nan_strategy="disable") for stage in STAGES}
        )
        self.metrics.update({f"{stage}_acc": _accuracy(num_classes, top_k=1) for stage in STAGES})
        if num_classes > 5:
            self.metrics.update({f"{stage}_acc5": _accuracy(num_classes, 5) for stage in STAGES})

    def check_image_size(self, height: int, width: int) -> None:
        """Raise ``ValueError`` when the network cannot take ``height`` x ``width`` images
        (GoogLeNet's ImageNet stem on 32x32 images, a ViT built for another size), before any
        training: a copy on the meta device runs one training-mode batch, which checks every
        shape and computes nothing."""
        hp = self.hparams
        with torch.device("meta"):
            net = create_model(
                hp.arch, num_classes=hp.num_classes, in_chans=hp.in_chans, **self._net_options
            )
            images = torch.empty(2, hp.in_chans, height, width)
        try:
            net.train()(images)
        except (RuntimeError, ValueError, AssertionError) as err:  # timm asserts its size
            reason = " ".join(str(err).split())
            raise ValueError(f"{hp.arch} cannot take {height}x{width} images: {reason}") from None

    def configure_callbacks(self) -> list[pl.Callback]:
        # A callback, not this module's setup/teardown hooks: Lightning tells callbacks, not
        # modules, when a call fails, and the previous TF32 setting must come back then too.
        return [TF32Setting(self.hparams.tf32)]

    def configure_model(self) -> None:
        # In-place compile keeps parameter names (no ``_orig_mod.``), so checkpoints load into
        # compiled and eager models alike.
        if self.hparams.compile and not is_compiled_module(self.net):
            self.net.compile()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (also for models with auxiliary heads in training mode)."""
        out = self.net(self._prepare(x))
        return out.logits if isinstance(out, AuxLogits) else out

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        out = self.net(self._prepare(x))
        smoothing = self.hparams.label_smoothing
        if isinstance(out, AuxLogits):
            logits = out.logits
            loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
            if stage == "train":
                aux = sum(F.cross_entropy(a, y, label_smoothing=smoothing) for a in out.aux)
                loss = loss + self.hparams.aux_weight * aux
        else:
            logits = out
            loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        # Update, not forward: no per-batch value is computed. The loss counts once per image.
        self.metrics[f"{stage}_loss"].update(loss.detach().expand(len(y)))
        for name in (f"{stage}_acc", f"{stage}_acc5"):
            if name in self.metrics:
                self.metrics[name].update(logits, y)
        return loss

    def _log_epoch_metrics(self, stage: str) -> None:
        # Lightning computes each metric (synced across processes) and resets it.
        for name in (f"{stage}_loss", f"{stage}_acc", f"{stage}_acc5"):
            if name in self.metrics:
                key = f"{stage}/{name.split('_', 1)[1]}"
                metric = self.metrics[name]
                self.log(key, metric, on_step=False, on_epoch=True, prog_bar=key == "val/acc")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        # Only on the steps where Lightning writes to the loggers (the value it would write).
        trainer = attached_trainer(self)
        if trainer is None or should_update_logs(trainer):
            # Under DDP, the mean over the processes: the global batch's loss, as on one.
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, sync_dist=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Class probabilities for each image of the batch."""
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self(x).softmax(dim=-1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = self.net.parameters()
        if hp.optimizer == "adam":
            optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.SGD(
                params,
                lr=hp.lr,
                momentum=hp.momentum,
                nesterov=hp.nesterov,
                weight_decay=hp.weight_decay,
            )
        if hp.scheduler == "none":
            return optimizer
        if hp.scheduler == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, hp.step_size, gamma=hp.gamma)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler}}
        if hp.scheduler == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=hp.gamma, patience=hp.patience
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": "val/acc"},
            }
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if hp.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=total, eta_min=hp.lr_min
            )
        elif hp.scheduler == "multistep":
            milestones = [math.ceil(m * total) for m in hp.milestones]
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, hp.gamma)
        else:
            warmup = max(1, round(hp.warmup_fraction * total))
            scheduler = torch.optim.lr_scheduler.SequentialLR(
                optimizer,
                [
                    torch.optim.lr_scheduler.LinearLR(optimizer, 1.0 / warmup, total_iters=warmup),
                    torch.optim.lr_scheduler.CosineAnnealingLR(
                        optimizer, T_max=max(1, total - warmup), eta_min=hp.lr_min
                    ),
                ],
                milestones=[warmup],
            )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class TF32Setting(pl.Callback):
    """Whether fp32 CUDA matmuls and cuDNN convolutions may run in TF32, for the span of each
    Trainer call (fit, validate, test, predict); the previous setting comes back when the call
    ends, also when it fails, so that code run afterwards in the same process is not surprised.

    TF32 keeps 10 mantissa bits of fp32's 23, which moves results by ~1e-3 relative on Ampere
    and newer GPUs. PyTorch's defaults differ by kind: convolutions may use it
    (``torch.backends.cudnn.allow_tf32``), matmuls may not
    (``torch.backends.cuda.matmul.allow_tf32``); this sets both. :class:`ImageClassifier` adds
    one from its ``tf32`` argument (it takes priority over one given to the Trainer).

    Args:
        allow: ``True`` lets both use TF32; ``False`` keeps both in true fp32.
    """

    def __init__(self, allow: bool) -> None:
        self.allow = allow
        self._restore: Callable[[], None] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._restore is None:
            self._restore = _tf32_restorer()
        # The legacy flags: setting them keeps every reader consistent (the per-operator API's
        # "tf32" makes torch.get_float32_matmul_precision(), which Lightning reads, raise).
        torch.backends.cuda.matmul.allow_tf32 = self.allow
        torch.backends.cudnn.allow_tf32 = self.allow

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._put_back()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._put_back()

    def _put_back(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None


def _tf32_restorer() -> Callable[[], None]:
    """A function that puts PyTorch's current TF32 settings back exactly."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    flags = []
    for owner in (matmul, cudnn):
        # unreadable once set through the per-operator API: its precisions hold the state
        with contextlib.suppress(RuntimeError):
            flags.append((owner, owner.allow_tf32))
    # torch >= 2.9 keeps the state per operator (read and put back after the legacy flags,
    # which overwrite them)
    switches = (matmul, cudnn.conv, cudnn.rnn) if hasattr(cudnn, "conv") else ()
    precisions = [(switch, switch.fp32_precision) for switch in switches]

    def restore() -> None:
        for owner, allowed in flags:
            owner.allow_tf32 = allowed
        for switch, precision in precisions:
            switch.fp32_precision = precision

    return restore


def _accuracy(num_classes: int, top_k: int) -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes=num_classes, top_k=top_k, average="micro")
