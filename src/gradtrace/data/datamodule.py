"""``ImageDataModule``: whole splits in memory, batches cut by index, augmentation on the device.

airbench's speed recipe: each split is one uint8 tensor (on the GPU when training on CUDA and
it fits, :mod:`~gradtrace.data.residency`), a batch is ``images[indices]``
(:mod:`~gradtrace.data.batches`: seeded, sharded, resumable), and the crop, flip and
normalisation run on the whole batch on the device in ``on_after_batch_transfer``
(:mod:`~gradtrace.data.augmentation`). No per-sample Python, no worker processes. Options are
checked by :mod:`~gradtrace.data.options`, splits read and cut by :mod:`~gradtrace.data.splits`;
the first ``setup`` logs the settings a run actually uses (:meth:`ImageDataModule.describe`).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from gradtrace import data as ds
from gradtrace.checks import check_choice, check_int
from gradtrace.data.augmentation import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    NORMALIZATIONS,
    channel_stats,
    crop_flip,
    normalize,
    resolve_augment,
)
from gradtrace.data.batches import EvalBatches, TrainBatches
from gradtrace.data.options import (
    check_md5,
    check_synthetic_sizes,
    default_augment,
    resolve_classes,
    resolve_image_size,
)
from gradtrace.data.residency import split_device
from gradtrace.data.splits import (
    carve_splits,
    check_files_present,
    check_split_sizes,
    conform,
    is_flat_image_folder,
    known_pool_size,
    read_source,
    training_subset,
)

__all__ = ["ImageDataModule"]

log = logging.getLogger(__name__)


class ImageDataModule(L.LightningDataModule):
    """Image classification data, held in memory as uint8 tensors, for any gradtrace model.

    Args:
        dataset: ``cifar10``, ``cifar100``, ``fashion_mnist``, ``synthetic`` or
            ``imagefolder:<path>``.
        root: folder of the dataset files (CIFAR archives, Fashion-MNIST IDX); downloads too.
        batch_size: training images per step and process (the global batch is
            ``batch_size * world_size``). ``gradtrace fit`` reads ``--data.batch_size`` as the
            global batch and gives each process its share.
        eval_batch_size: validation/test/predict batch per process (default ``batch_size``;
            global on the command line, as ``batch_size``).
        val_size: images held out of the official training set as the class-balanced,
            seeded validation split (CIFAR-100: 47,500 / 2,500 / 10,000). Ignored when an
            ImageFolder tree has its own ``val/``.
        test_size: size of the test split carved (class-balanced) from a flat ImageFolder tree,
            which has no test set of its own (default ``val_size``); not valid elsewhere.
        subset: train on a class-balanced subset of this many training images (quick runs;
            validation and test are untouched).
        seed: seeds the split, the subset, the shuffling and the augmentation.
        augment: training augmentation, one of ``none``, ``crop`` (random crop with
            ``crop_padding`` zero padding) or ``crop_flip`` (the crop, then a random horizontal
            flip). Default: ``crop_flip`` for CIFAR (the coursework's), ``none`` elsewhere (a
            flip is not safe for unknown data such as handwriting). ``true`` is shorthand for
            ``crop_flip``, ``false`` for ``none``.
        normalization: ``split`` (the training split's own per-channel mean and std) or
            ``cifar10`` (the original coursework code's fixed CIFAR-10 constants; 3 channels).
        crop_padding: zero padding of the random crop, in pixels.
        download: download a missing CIFAR archive or Fashion-MNIST (locked, MD5-checked).
        channels: 1 or 3 (default: the dataset's own; grey is repeated, RGB is converted).
        image_size: ``H`` or ``(H, W)`` to resize to (default 32x32, Fashion-MNIST padded).
        num_classes: class count of ``synthetic`` data (default 10); elsewhere it must match.
        synthetic_sizes: ``(training pool, test)`` image counts of ``synthetic`` data.
        md5: expected MD5 of the CIFAR archive (default: the published one).
        device_resident: keep the uint8 splits on the training device so batches never cross
            PCIe. Default (``None``): on a CUDA device when they take at most half of its free
            memory (one line says when they do not), never on a CPU; ``True``: always;
            ``False``: never.
    """

    def __init__(
        self,
        dataset: str = "cifar100",
        root: str = "data",
        batch_size: int = 100,
        eval_batch_size: int | None = None,
        val_size: int = 2500,
        test_size: int | None = None,
        subset: int | None = None,
        seed: int = 0,
        augment: bool | str | None = None,
        normalization: str = "split",
        crop_padding: int = 4,
        download: bool = True,
        channels: int | None = None,
        image_size: int | tuple[int, int] | None = None,
        num_classes: int | None = None,
        synthetic_sizes: tuple[int, int] = (50_000, 10_000),
        md5: str | None = None,
        device_resident: bool | None = None,
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self._kind, self._folder = ds.parse_dataset(dataset)
        check_int("batch_size", batch_size, 1)
        check_int("eval_batch_size", eval_batch_size, 1, optional=True)
        check_int("val_size", val_size, 0)
        check_int("test_size", test_size, 1, optional=True)
        check_int("subset", subset, 1, optional=True)
        check_int("seed", seed, 0)
        check_int("crop_padding", crop_padding, 0)
        check_choice("normalization", normalization, NORMALIZATIONS)
        augment = resolve_augment(augment, default_augment(self._kind))
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be one of 1, 3 or None; got {channels!r}")
        check_md5(md5, self._kind, dataset)
        check_synthetic_sizes(synthetic_sizes)
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_size, self.test_size, self.subset = val_size, test_size, subset
        self.seed, self.augment, self.crop_padding = seed, augment, crop_padding
        self.normalization = normalization
        self.download, self.md5, self.device_resident = download, md5, device_resident
        self.synthetic_sizes = tuple(synthetic_sizes)
        self._size = resolve_image_size(image_size)
        self._channels = channels or (1 if self._kind == "fashion_mnist" else 3)
        if normalization == "cifar10" and self._channels != 3:
            raise ValueError(
                f"normalization cifar10 needs 3 channels (its constants are per RGB channel); "
                f"got channels={self._channels}: use normalization split or channels 3"
            )
        self._num_classes, self._classes = resolve_classes(
            self._kind, self._folder, dataset, num_classes
        )
        if test_size is not None and self._carved_test_size() is None:
            raise ValueError(
                "test_size only applies to an imagefolder tree without train/ (other datasets "
                f"have their own test set); got test_size={test_size} with dataset {dataset!r}"
            )
        if not download:
            check_files_present(self._kind, root, md5)
        pool = known_pool_size(self._kind, root, md5, self.synthetic_sizes)
        if pool is not None:
            self._check_sizes(pool, world_size=1)
        self._splits: dict[str, ds.Split] | None = None
        self._said_not_resident = False
        self._mean: torch.Tensor | None = None
        self._std: torch.Tensor | None = None
        self._stats_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.save_hyperparameters()
        # Saved resolved: Lightning refuses to start when a key of the model's hparams (which
        # gets num_classes linked from here) differs in the data module's, and under
        # LightningCLI the first call records the config as given (num_classes: null). A second
        # call updates both hparams and the hparams_initial that loggers record.
        self.save_hyperparameters(
            {
                "num_classes": self._num_classes,
                "channels": self._channels,
                "image_size": self._size,
                "augment": self.augment,
            }
        )

    # ---- what is known before setup (LightningCLI links these into the model)

    @property
    def num_classes(self) -> int:
        """Number of classes (known at construction)."""
        return self._num_classes

    @property
    def num_channels(self) -> int:
        """Channels of the images the model receives (known at construction)."""
        return self._channels

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the images the model receives (known at construction)."""
        return self._size

    # ---- available after setup

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in index order (CIFAR's come from its archive: known after setup)."""
        if self._classes is None:
            self._require_setup()
            assert self._classes is not None
        return self._classes

    @property
    def mean(self) -> torch.Tensor:
        """Per-channel mean in [0, 1] used to normalise: the training split's (before
        ``subset``) or, with ``normalization="cifar10"``, the fixed constants."""
        self._require_setup()
        assert self._mean is not None
        return self._mean

    @property
    def std(self) -> torch.Tensor:
        """Per-channel standard deviation in [0, 1] used to normalise (see :attr:`mean`)."""
        self._require_setup()
        assert self._std is not None
        return self._std

    def split(self, name: str) -> ds.Split:
        """``(images uint8 [N, C, H, W], labels int64 [N])`` of ``train``, ``val`` or ``test``.

        The exact tensors the loaders cut batches from (``train`` after ``subset``), on the
        training device when device-resident.
        """
        splits = self._require_setup()
        check_choice("split", name, ("train", "val", "test"))
        return splits[name]

    # ---- Lightning hooks

    def prepare_data(self) -> None:
        """Download a missing CIFAR archive / Fashion-MNIST (once per node, rank 0)."""
        if not self.download:
            return
        if self._kind in ("cifar10", "cifar100"):
            ds.download_cifar(self._kind, self.root, self.md5)
        elif self._kind == "fashion_mnist":
            ds.locate_fashion_mnist(self.root, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Load the dataset once, split it, compute the normalisation, place it on the device."""
        if self._splits is None:
            self._splits = self._load_splits()
            if self._dist()[1] == 0:  # global rank 0
                log.info("%s", self.describe())
        device = self._target_device()
        if device is not None and self._splits["train"][0].device != device:
            self._splits = {
                name: (images.to(device), labels.to(device))
                for name, (images, labels) in self._splits.items()
            }

    def describe(self) -> str:
        """One line: the dataset, split sizes, image shape, augmentation and normalisation."""
        sizes = ", ".join(
            f"{self.split(name)[1].numel():,} {name}" for name in ("train", "val", "test")
        )
        shape = "x".join(map(str, (self._channels, *self._size)))
        return (
            f"Data: {self.dataset}: {sizes} images of {shape}; augment {self.augment}; "
            f"normalization {self.normalization}"
        )

    def train_dataloader(self) -> TrainBatches:
        images, labels = self.split("train")
        world_size, rank = self._dist()
        return TrainBatches(
            images,
            labels,
            self.batch_size,
            seed=self.seed,
            world_size=world_size,
            rank=rank,
            augment=self.augment,
            padding=self.crop_padding,
            trainer=self.trainer,
        )

    def val_dataloader(self) -> EvalBatches:
        return self._eval_batches("val")

    def test_dataloader(self) -> EvalBatches:
        return self._eval_batches("test")

    def predict_dataloader(self) -> EvalBatches:
        """The test split, in order (batches are ``(images, labels)``)."""
        return self._eval_batches("test")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the training device: crop + flip training batches, normalise every batch.

        Returns ``(images float32 [B, C, H, W], labels int64 [B])``.
        """
        return self.transform_batch(batch)

    def transform_batch(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """What :meth:`on_after_batch_transfer` does, for use outside a Trainer."""
        images, labels = batch[0], batch[1]
        if len(batch) == 3:  # a training batch carrying its crops (and flips)
            images = crop_flip(images, batch[2], self.crop_padding)
        if images.device not in self._stats_on:
            self._stats_on[images.device] = (
                self.mean.to(images.device),
                self.std.to(images.device),
            )
        x = normalize(images, *self._stats_on[images.device])
        if self.trainer is not None:  # "16-true"/"bf16-true" models want their own dtype
            x, labels = self.trainer.precision_plugin.convert_input((x, labels))
        return x, labels

    def _require_setup(self) -> dict[str, ds.Split]:
        if self._splits is None:
            raise RuntimeError("ImageDataModule.setup() has not run yet: call dm.setup('fit')")
        return self._splits

    def _dist(self) -> tuple[int, int]:
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def _target_device(self) -> torch.device | None:
        """Where the splits live (see :func:`~gradtrace.data.residency.split_device`);
        ``None``: where they were loaded. Says once (rank zero) when they do not fit."""
        if self.trainer is None:
            return None
        device, reason = split_device(
            self._splits, self.trainer.strategy.root_device, self.device_resident
        )
        if reason is not None:
            if not self._said_not_resident and self._dist()[1] == 0:
                log.info("%s", reason)
            self._said_not_resident = True
        return device

    def _eval_batches(self, name: str) -> EvalBatches:
        images, labels = self.split(name)
        if name == "test" and labels.numel() == 0 and self._kind == "imagefolder":
            raise ValueError(
                f"{self.dataset} has train/ but no test/ folder, so there is no test split"
            )
        world_size, rank = self._dist()
        return EvalBatches(images, labels, self.eval_batch_size, world_size=world_size, rank=rank)

    def _check_sizes(self, pool: int, world_size: int, has_val: bool = False) -> None:
        """Fail with the valid range when the split sizes do not fit ``pool`` training images."""
        check_split_sizes(
            self.dataset,
            pool,
            global_batch=self.batch_size * world_size,
            val_size=0 if has_val else self.val_size,
            carved_test=self._carved_test_size() or 0,
            subset=self.subset,
        )

    def _carved_test_size(self) -> int | None:
        """Size of the test split carved from a flat ImageFolder tree (no ``train/``);
        ``None`` for a source with a test split of its own (possibly empty)."""
        if not is_flat_image_folder(self._kind, self._folder):
            return None
        return self.test_size or self.val_size

    def _load_splits(self) -> dict[str, ds.Split]:
        data = read_source(
            self._kind,
            self._folder,
            self.root,
            md5=self.md5,
            download=self.download,
            num_classes=self._num_classes,
            channels=self._channels,
            size=self._size,
            synthetic_sizes=self.synthetic_sizes,
        )
        self._classes = data.classes
        pool = conform(data.train, self._channels, self._size)
        self._check_sizes(pool[1].numel(), self._dist()[0], has_val=data.val is not None)
        train, val, test = carve_splits(
            pool,
            data.val,
            data.test,
            val_size=self.val_size,
            carved_test=self._carved_test_size(),
            seed=self.seed,
            num_classes=self._num_classes,
        )
        if self.normalization == "cifar10":
            self._mean, self._std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
        else:
            self._mean, self._std = channel_stats(train[0])
        if self.subset is not None:
            train = training_subset(train, self.subset, self.seed, self._num_classes)
        return {
            "train": train,
            "val": conform(val, self._channels, self._size),
            "test": conform(test, self._channels, self._size),
        }
