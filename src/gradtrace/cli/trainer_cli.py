"""``gradtrace fit|validate|test|predict``: a LightningCLI over :class:`ImageClassifier` and
:class:`ImageDataModule` with the study's defaults: fp32 (``32-true``; bf16 is
``--trainer.precision bf16-mixed``), GradientFlow, checkpoints (``last.ckpt`` always, best
``val/acc``), learning-rate monitor, a CSV logger always, W&B when asked or under
``wandb agent``. Each run writes into one fixed directory named by
:mod:`gradtrace.cli.run_identity`; ``--ckpt_path last`` resumes it there.

One device per run (``devices=1``, not Lightning's ``auto``, which takes every GPU of a node
for DDP); where more GPUs are visible, one line says so and how to use them.
``--trainer.devices N`` runs DDP over N processes with the same global batch:
``--data.batch_size`` and ``--data.eval_batch_size`` are global, each process takes 1/N.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from gradtrace.classifier import ImageClassifier
from gradtrace.cli.configs import list_configs, resolve_config_args
from gradtrace.cli.errors import UserError
from gradtrace.cli.run_identity import ContinuousRunFiles, ResumeCheckpoint, RunCSVLogger, run_name
from gradtrace.cli.wandb_login import check_wandb_login, wandb_wanted
from gradtrace.compat import lightning_cli_config_value, set_subcommand_option_help
from gradtrace.data.datamodule import ImageDataModule
from gradtrace.gradient_flow import GradientFlow

__all__ = [
    "SUBCOMMAND_DESCRIPTIONS",
    "GradtraceCLI",
    "SavePredictions",
    "idle_gpus_note",
    "last_checkpoint",
    "parsed_cli",
    "run_directory",
]

log = logging.getLogger(__name__)

SUBCOMMAND_DESCRIPTIONS = {
    "fit": "Train a model; each run writes into its own directory under runs/, and "
    "--ckpt_path last resumes it there.",
    "validate": "Evaluate a model (a checkpoint with --ckpt_path) on the validation split.",
    "test": "Evaluate a model (a checkpoint with --ckpt_path) on the test split.",
    "predict": "Write a model's class probabilities for the test split to predictions.pt in "
    "its run directory.",
}
"""The LightningCLI subcommands and what each does, in one sentence."""

CKPT_PATH_HELP = {
    "fit": "`last` resumes this run from <run directory>/checkpoints/last.ckpt (one line says "
    "so when there is none), or the path of a checkpoint to resume from; default: start afresh.",
    **{
        stage: "The checkpoint to evaluate: `last` (this run's checkpoints/last.ckpt) or a "
        "path; default: the model as initialised."
        for stage in ("validate", "test", "predict")
    },
}


def idle_gpus_note(how: str) -> str | None:
    """``gradtrace: N GPUs visible, using 1; <how>`` where several CUDA GPUs are visible,
    else ``None``. ``how`` says how to use them; ``{n}`` in it becomes N and ``{ids}``
    becomes ``0,1,...,N-1``."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < 2:
        return None
    ids = ",".join(map(str, range(visible)))
    return f"gradtrace: {visible} GPUs visible, using 1; {how.format(n=visible, ids=ids)}"


def _lightning_checkpoint_keyword(path: str) -> bool:
    # What Trainer.fit resolves itself: best/hpc/registry checkpoints and remote URLs.
    return path in ("best", "hpc") or path.startswith("registry") or "://" in path


def last_checkpoint(run_dir: Path) -> Path | None:
    """The run's resume checkpoint, ``<run_dir>/checkpoints/last.ckpt``, if it exists."""
    path = run_dir / "checkpoints" / "last.ckpt"
    return path if path.is_file() else None


class SavePredictions(BasePredictionWriter):
    """Write ``gradtrace predict``'s class probabilities to ``<log_dir>/predictions.pt``.

    One ``[N, classes]`` tensor in the order of the predict split (the test split); under DDP
    each rank writes ``predictions_rank<r>.pt`` with its own shard.
    """

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(
        self,
        trainer: Trainer,
        pl_module: Any,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any] | None,
    ) -> None:
        name = (
            "predictions.pt"
            if trainer.world_size == 1
            else f"predictions_rank{trainer.global_rank}.pt"
        )
        path = Path(trainer.log_dir or trainer.default_root_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.cat(list(predictions)).cpu(), path)


class GradtraceCLI(LightningCLI):
    """LightningCLI with gradtrace's defaults; see the module docstring."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        """Parse ``args`` (default: the command line) and, when ``run``, run the subcommand.

        A shipped config name after ``--config`` is resolved to its file. Parse errors raise
        jsonargparse's ``ArgumentError`` instead of exiting, so :func:`main` can print them as
        one line. The optimizer and its schedule are the model's options
        (``--model.optimizer``, ``--model.scheduler``), so they are part of the run's identity:
        LightningCLI's own ``--optimizer`` and ``--lr_scheduler`` are not offered.
        """
        configs = ", ".join(list_configs())
        strict = {"exit_on_error": False, "allow_abbrev": False}  # no --trainer.max_step
        super().__init__(
            ImageClassifier,
            ImageDataModule,
            seed_everything_default=0,
            # fp32 stated, not implied: bf16 moves per-layer gradients of deep plain nets.
            # One device: Lightning's "auto" takes every GPU of a node (DDP, N times the batch).
            trainer_defaults={"default_root_dir": "runs", "precision": "32-true", "devices": 1},
            # A resumed run writes its config into its own directory again.
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={
                "prog": "gradtrace",
                "description": "Train and evaluate gradtrace models (gradtrace --help lists "
                "every command).",
                **strict,
                **{
                    name: {
                        "description": f"{text} Shipped configs (--config NAME): {configs}. "
                        "--debug shows the traceback of a user error instead of one line.",
                        **strict,
                    }
                    for name, text in SUBCOMMAND_DESCRIPTIONS.items()
                },
            },
            args=None if args is None else resolve_config_args(list(args)),
            run=run,
        )

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:
            set_subcommand_option_help(self, "ckpt_path", CKPT_PATH_HELP)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="Run directory under trainer.default_root_dir (default: a readable prefix and "
            "a hash of the settings, or the W&B run id under `wandb agent`).",
        )
        parser.add_argument(
            "--wandb",
            type=bool | None,
            default=None,
            help="Also log to Weights & Biases (default: only under `wandb agent`). "
            "WANDB_MODE=offline logs without network; `wandb sync` uploads later.",
        )
        parser.add_argument(
            "--wandb_project",
            type=str,
            default="gradtrace",
            help="The W&B project the run logs to, with --wandb true (under `wandb agent`: the "
            "sweep's project).",
        )
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_channels", "model.in_chans", apply_on="instantiate")

    def _settings(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    @property
    def run_dir(self) -> Path:
        """``<default_root_dir>/<run_name>``: everything this run writes lives there."""
        settings = self._settings()
        name = settings.run_name or run_name(settings.as_dict())
        return Path(settings.trainer.default_root_dir or "runs") / name

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        settings = self._settings()
        trainer_config = lightning_cli_config_value(self, self.config_init, "trainer", {})
        run_dir = self.run_dir
        # What Lightning writes into its root by itself (SLURM's hpc_ckpt_N.ckpt on a requeue
        # signal, restored by the next fit there) belongs to this run, not to runs/.
        kwargs["default_root_dir"] = str(run_dir)
        if trainer_config.get("logger") in (None, True):
            loggers: list[Logger] = [RunCSVLogger(save_dir=run_dir.parent, name=run_dir.name)]
            if wandb_wanted(settings.wandb):
                from lightning.pytorch.loggers import WandbLogger

                loggers.append(
                    WandbLogger(
                        project=settings.wandb_project, name=run_dir.name, save_dir=str(run_dir)
                    )
                )
            kwargs["logger"] = loggers
        configured = list(trainer_config.get("callbacks") or [])
        defaults: list[Callback] = [
            GradientFlow(),
            ModelCheckpoint(
                filename="best-{epoch:03d}-{step:06d}",
                monitor="val/acc",
                mode="max",
                save_top_k=1,
                auto_insert_metric_name=False,
            ),
            LearningRateMonitor(logging_interval="step"),
        ]
        if self.subcommand == "predict":
            defaults.append(SavePredictions())
        kwargs["callbacks"] = [
            ContinuousRunFiles(),  # first: it empties a restarted run's CSVs before they open
            *configured,
            *(cb for cb in defaults if not any(type(c) is type(cb) for c in configured)),
            ResumeCheckpoint(),  # always: --ckpt_path last needs it
        ]
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.world_size > 1 and isinstance(self.datamodule, ImageDataModule):
            self._split_global_batch(self.datamodule, trainer)
        return trainer

    @staticmethod
    def _split_global_batch(data: ImageDataModule, trainer: Trainer) -> None:
        # The data module's batch sizes are per process; the command's are global.
        processes = trainer.world_size
        for option in ("batch_size", "eval_batch_size"):
            size = getattr(data, option)
            if size % processes:
                raise ValueError(
                    f"data.{option} is the global batch, split equally over the {processes} "
                    f"processes: it must be a multiple of {processes}; got {size}"
                )
            setattr(data, option, size // processes)
        if trainer.global_rank == 0:
            log.info(
                "gradtrace: DDP over %d processes: global batch %d, %d per process",
                processes,
                data.batch_size * processes,
                data.batch_size,
            )

    def before_instantiate_classes(self) -> None:
        settings = self._settings()
        if wandb_wanted(settings.wandb):
            check_wandb_login()
        trainer = settings.trainer
        if str(trainer.devices) == "1" and str(trainer.accelerator) in ("auto", "gpu", "cuda"):
            note = idle_gpus_note(
                "--trainer.devices={n} runs DDP over {n} with the same global batch"
            )
            if note is not None and rank_zero_only.rank == 0:
                log.info("%s", note)

    def _resolve_ckpt_path(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            config["ckpt_path"] = str(self._last_checkpoint())
        path = config.get("ckpt_path")
        if path is None or _lightning_checkpoint_keyword(str(path)):
            return
        if not Path(path).is_file():
            raise UserError(
                f"--ckpt_path {path}: no such file; give `last` (this run's "
                "checkpoints/last.ckpt) or the path of a checkpoint"
            )
        if rank_zero_only.rank == 0:
            # Memory-mapped: only the two counters are read, whatever the checkpoint's size.
            saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            doing = "resuming from" if self.subcommand == "fit" else "loading"
            log.info(
                "gradtrace: %s %s (saved at epoch %s, step %s)",
                doing,
                path,
                saved.get("epoch"),
                saved.get("global_step"),
            )

    def _last_checkpoint(self) -> Path:
        last = last_checkpoint(self.run_dir)
        if last is None:
            raise UserError(
                f"--ckpt_path last: no checkpoint at {self.run_dir}/checkpoints/last.ckpt (this "
                "run has not finished an epoch with these settings; check "
                "--trainer.default_root_dir and --run_name, or leave out --ckpt_path to start)"
            )
        return last

    def instantiate_classes(self) -> None:
        # Model and data options are checked when the classes are built; report a bad value
        # like a bad flag (usage + message, exit 2) instead of a traceback.
        try:
            super().instantiate_classes()
            if isinstance(self.model, ImageClassifier) and isinstance(
                self.datamodule, ImageDataModule
            ):
                self.model.check_image_size(*self.datamodule.image_size)
        except ValueError as err:
            self.parser.error(str(err))

    def before_fit(self) -> None:
        self._resolve_ckpt_path()

    def before_validate(self) -> None:
        self._resolve_ckpt_path()

    def before_test(self) -> None:
        self._resolve_ckpt_path()

    def before_predict(self) -> None:
        self._resolve_ckpt_path()


class _Parsed(Exception):
    def __init__(self, cli: GradtraceCLI) -> None:
        self.cli = cli


class _ParseOnlyCLI(GradtraceCLI):
    """Stops once the arguments are parsed, before anything is built or seeded."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        # Not LightningCLI's parse_arguments: it warns when given args while sys.argv has
        # its own (a launcher's), which is what parsed_cli is for.
        self.config = parser.parse_args(args)
        self.subcommand = self.config.get("subcommand")
        raise _Parsed(self)


def parsed_cli(args: Sequence[str]) -> GradtraceCLI:
    """``gradtrace <args>`` (``args`` start with the subcommand) parsed and nothing else: its
    ``config`` (the subcommand's settings under its name), ``run_dir`` and parsers, with no
    model, data or Trainer built and nothing seeded."""
    try:
        _ParseOnlyCLI(args=args)
    except _Parsed as parsed:
        return parsed.cli
    raise AssertionError("unreachable: the CLI always parses before it builds")


def run_directory(args: Sequence[str]) -> Path:
    """The run directory ``gradtrace <args>`` writes to (``args`` start with the subcommand),
    found by parsing only: how launchers know where a run goes before starting it.
    Under ``wandb agent`` the environment's run id names it (see :mod:`gradtrace.cli.run_identity`).
    """
    return parsed_cli(args).run_dir
