"""``ImageDataModule``: whole splits in memory, batches cut by index, augmentation on the device.

The speed recipe is airbench's: each split is one uint8 tensor (moved to the GPU once when
training on CUDA, if the splits take at most half of its free memory), a batch is
``images[indices]``, and the random crop (+ flip) and the normalisation run on the whole batch
on the training device in ``on_after_batch_transfer``, as one gather. No per-sample Python, no
worker processes. The batches are :mod:`gradtrace.data.batches`' (seeded, sharded, resumable: see
there for the determinism and DDP guarantees); the augmentation and normalisation are
:mod:`gradtrace.data.augmentation`'s. The validation split and the subset are pure functions of
``seed``. On its first ``setup`` it logs one line (:meth:`ImageDataModule.describe`) with the
settings a run actually uses.

This module is one class, over ~400 lines because each of its 18 options is checked in the
constructor with a message saying what is valid; what stands alone (reading the sources,
cutting batches, augmenting) lives in :mod:`gradtrace.data`, :mod:`gradtrace.data.batches` and
:mod:`gradtrace.data.augmentation`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from gradtrace import data as ds
from gradtrace.data.augmentation import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    NORMALIZATIONS,
    channel_stats,
    crop_flip,
    normalize,
    resolve_augment,
    sample_crops,
)
from gradtrace.data.batches import (
    EvalBatches,
    TrainBatches,
    epoch_order,
    eval_batch_bounds,
    train_batch_indices,
)
from gradtrace.checks import check_choice, check_int

# The batch and augmentation functions were defined here first; importers keep working.
__all__ = [
    "EvalBatches",
    "ImageDataModule",
    "TrainBatches",
    "channel_stats",
    "crop_flip",
    "epoch_order",
    "eval_batch_bounds",
    "normalize",
    "sample_crops",
    "train_batch_indices",
]

log = logging.getLogger(__name__)

CIFAR_TRAIN_SIZE = 50_000  # images in the official CIFAR-10 and CIFAR-100 training archives
# By default the splits go to a CUDA device only if they take at most this share of its free
# memory: the rest is the training's (activations, optimizer state, the compiler's buffers).
RESIDENT_SHARE = 0.5


def _default_augment(kind: str) -> str:
    # Crop + flip is the coursework's CIFAR augmentation; for other data (handwriting, an
    # ImageFolder of unknown content) a flip can change the class, so nothing by default.
    return "crop_flip" if kind in ("cifar10", "cifar100") else "none"


class ImageDataModule(L.LightningDataModule):
    """Image classification data, held in memory as uint8 tensors, for any gradtrace model.

    Args:
        dataset: ``cifar10``, ``cifar100``, ``fashion_mnist``, ``synthetic`` or
            ``imagefolder:<path>``.
        root: folder holding the dataset files (CIFAR archives, Fashion-MNIST IDX files);
            downloads go there.
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
        download: download a missing CIFAR archive or Fashion-MNIST (needs internet); one
            process at a time per file, MD5-checked, so concurrent runs share one download.
        channels: 1 or 3 (default: the dataset's own; grey is repeated, RGB is converted).
        image_size: ``H`` or ``(H, W)`` to resize to (default 32x32, Fashion-MNIST padded).
        num_classes: class count of ``synthetic`` data (default 10); other datasets define
            their own, and a different value is an error.
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
        augment = resolve_augment(augment, _default_augment(self._kind))
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be one of 1, 3 or None; got {channels!r}")
        if md5 is not None and self._kind not in ("cifar10", "cifar100"):
            raise ValueError(f"md5 only applies to cifar10 and cifar100; got dataset {dataset!r}")
        if md5 is not None and not (
            isinstance(md5, str) and len(md5) == 32 and all(c in "0123456789abcdef" for c in md5)
        ):
            raise ValueError(f"md5 must be 32 lowercase hex digits; got {md5!r}")
        if len(synthetic_sizes) != 2 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in synthetic_sizes
        ):
            raise ValueError(
                f"synthetic_sizes must be two integers >= 1 (training pool, test); "
                f"got {synthetic_sizes!r}"
            )
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_size, self.test_size, self.subset = val_size, test_size, subset
        self.seed, self.augment, self.crop_padding = seed, augment, crop_padding
        self.normalization = normalization
        self.download, self.md5, self.device_resident = download, md5, device_resident
        self.synthetic_sizes = tuple(synthetic_sizes)
        self._size = self._resolve_size(image_size)
        self._channels = channels or (1 if self._kind == "fashion_mnist" else 3)
        if normalization == "cifar10" and self._channels != 3:
            raise ValueError(
                f"normalization cifar10 needs 3 channels (its constants are per RGB channel); "
                f"got channels={self._channels}: use normalization split or channels 3"
            )
        self._num_classes, self._classes = self._resolve_classes(num_classes)
        if test_size is not None and not self._flat_image_folder():
            raise ValueError(
                "test_size only applies to an imagefolder tree without train/ (other datasets "
                f"have their own test set); got test_size={test_size} with dataset {dataset!r}"
            )
        self._check_files()
        pool = self._known_pool_size()
        if pool is not None:
            self._check_sizes(pool, world_size=1)
        self._splits: dict[str, ds.Split] | None = None
        self._said_not_resident = False
        self._mean: torch.Tensor | None = None
        self._std: torch.Tensor | None = None
        self._stats_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.save_hyperparameters()
        # Saved resolved: Lightning refuses to start when a key of the model's hparams (which
        # gets num_classes linked from here) has a different value in the data module's. An
        # explicit update, because under LightningCLI save_hyperparameters records the config
        # as given (num_classes: null), not the local variables.
        # A second call updates both hparams and the hparams_initial that loggers record.
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

    # ---- internals

    def _require_setup(self) -> dict[str, ds.Split]:
        if self._splits is None:
            raise RuntimeError("ImageDataModule.setup() has not run yet: call dm.setup('fit')")
        return self._splits

    def _dist(self) -> tuple[int, int]:
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def _target_device(self) -> torch.device | None:
        """Where the splits live: the training device when asked (``device_resident``) or, by
        default, a CUDA device with room for them; ``None``: where they were loaded."""
        if self.trainer is None or self.device_resident is False:
            return None
        device = self.trainer.strategy.root_device
        if self.device_resident:
            return device
        if device.type != "cuda" or self._splits is None:
            return None
        if self._splits["train"][0].device == device:
            return device  # placed by an earlier setup
        return device if self._fits_on(device) else None

    def _fits_on(self, device: torch.device) -> bool:
        """Whether the splits take at most :data:`RESIDENT_SHARE` of ``device``'s free memory
        (every rank holds them whole on its own GPU); if not, says so once (rank zero)."""
        assert self._splits is not None
        needed = sum(t.nbytes for split in self._splits.values() for t in split)
        free, _ = torch.cuda.mem_get_info(device)
        if needed <= RESIDENT_SHARE * free:
            return True
        if not self._said_not_resident and self._dist()[1] == 0:
            log.info(
                "Data: the splits stay in host memory and each batch is copied to %s: they take "
                "%.3g GiB, more than %d%% of the %.3g GiB free there (device_resident=true puts "
                "them on the GPU anyway)",
                device,
                needed / 2**30,
                round(100 * RESIDENT_SHARE),
                free / 2**30,
            )
        self._said_not_resident = True
        return False

    def _eval_batches(self, name: str) -> EvalBatches:
        images, labels = self.split(name)
        if name == "test" and labels.numel() == 0 and self._kind == "imagefolder":
            raise ValueError(
                f"{self.dataset} has train/ but no test/ folder, so there is no test split"
            )
        world_size, rank = self._dist()
        return EvalBatches(images, labels, self.eval_batch_size, world_size=world_size, rank=rank)

    def _resolve_size(self, image_size: int | tuple[int, int] | None) -> tuple[int, int]:
        if image_size is None:
            return (32, 32)
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size
        ):
            raise ValueError(
                f"image_size must be an integer or (H, W), each >= 1; got {image_size!r}"
            )
        return size  # type: ignore[return-value]

    def _resolve_classes(self, num_classes: int | None) -> tuple[int, tuple[str, ...] | None]:
        if self._kind == "synthetic":
            check_int("num_classes", num_classes, 2, optional=True)
            return num_classes or 10, None
        if self._kind == "imagefolder":
            classes = tuple(ds.image_folder_classes(self._folder))
            count = len(classes)
        else:
            classes = ds.FASHION_MNIST_CLASSES if self._kind == "fashion_mnist" else None
            count = 100 if self._kind == "cifar100" else 10
        if num_classes is not None and num_classes != count:
            raise ValueError(
                f"num_classes is set by the data for {self.dataset} ({count} classes); "
                f"leave it unset (it only sizes synthetic data); got {num_classes}"
            )
        return count, classes

    def _check_files(self) -> None:
        if self.download:
            return
        if self._kind in ("cifar10", "cifar100"):
            archive = ds.cifar_archive(self._kind)
            path = Path(self.root) / archive.filename
            if not path.is_file():
                raise ds.DataNotFoundError(
                    ds.cifar_missing_message(archive, path, self.md5 or archive.md5)
                )
        elif self._kind == "fashion_mnist" and ds.find_fashion_mnist(self.root) is None:
            raise ds.DataNotFoundError(ds.fashion_mnist_missing_message(self.root))

    def _known_pool_size(self) -> int | None:
        """Training-pool size when it is cheap to know before loading, else None."""
        if self._kind == "synthetic":
            return self.synthetic_sizes[0]
        if self._kind in ("cifar10", "cifar100") and self.md5 is None:
            return CIFAR_TRAIN_SIZE  # the published checksum pins the content
        if self._kind == "fashion_mnist":
            return ds.fashion_mnist_train_size(self.root)
        return None

    def _check_sizes(self, pool: int, world_size: int, has_val: bool = False) -> None:
        """Fail with the valid range when the split sizes do not fit ``pool`` training images."""
        global_batch = self.batch_size * world_size
        name = self.dataset
        test = (self.test_size or self.val_size) if self._flat_image_folder() else 0
        val = 0 if has_val else self.val_size
        if pool - test - val < global_batch:
            test_note = f" after the test split of {test}" if test else ""
            raise ValueError(
                f"val_size must be at most {max(pool - test - global_batch, 0)} for {name}: it "
                f"has {pool} training images{test_note} and one global batch ({global_batch}) "
                f"must remain for training; got val_size={self.val_size}"
            )
        train = pool - test - val
        if self.subset is not None and not global_batch <= self.subset <= train:
            raise ValueError(
                f"subset must be between {global_batch} (one global batch) and {train} (the "
                f"training split of {name}); got {self.subset}"
            )

    def _flat_image_folder(self) -> bool:
        """An ImageFolder tree without ``train/``: test and validation are carved from it."""
        return self._kind == "imagefolder" and not (self._folder / "train").is_dir()

    def _load(self) -> ds.ImageData:
        if self._kind in ("cifar10", "cifar100"):
            return ds.read_cifar(self._kind, self.root, self.md5, self.download)
        if self._kind == "fashion_mnist":
            return ds.read_fashion_mnist(self.root, self.download)
        if self._kind == "synthetic":
            return ds.read_synthetic(
                self._num_classes, self._channels, self._size, self.synthetic_sizes
            )
        return ds.read_image_folder(self._folder, self._channels, self._size)

    def _conform(self, split: ds.Split) -> ds.Split:
        """Convert channels and resize to what the model expects (torchvision only if needed)."""
        images, labels = split
        if images.shape[1] == 1 and self._channels == 3:
            images = images.repeat(1, 3, 1, 1)
        elif images.shape[1] == 3 and self._channels == 1:
            from torchvision.transforms.v2.functional import rgb_to_grayscale

            images = rgb_to_grayscale(images)
        if tuple(images.shape[2:]) != self._size:
            from torchvision.transforms.v2.functional import resize

            images = resize(images, list(self._size), antialias=True)
        return images, labels

    def _load_splits(self) -> dict[str, ds.Split]:
        data = self._load()
        self._classes = data.classes
        pool_images, pool_labels = self._conform(data.train)
        test, val = data.test, data.val
        world_size, _ = self._dist()
        self._check_sizes(pool_labels.numel(), world_size, has_val=val is not None)
        if test is None and self._flat_image_folder():  # carve the test split first
            size = self.test_size or self.val_size
            chosen, rest = ds.class_balanced_split(
                pool_labels, size, ds.derive_seed("test", self.seed), self._num_classes
            )
            test = (pool_images[chosen], pool_labels[chosen])
            pool_images, pool_labels = pool_images[rest], pool_labels[rest]
        elif test is None:  # train/ (+ val/) without test/: there is no test set
            test = (pool_images[:0], pool_labels[:0])
        if val is None:
            chosen, rest = ds.class_balanced_split(
                pool_labels, self.val_size, ds.derive_seed("val", self.seed), self._num_classes
            )
            val = (pool_images[chosen], pool_labels[chosen])
            pool_images, pool_labels = pool_images[rest], pool_labels[rest]
        if self.normalization == "cifar10":
            self._mean, self._std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
        else:
            self._mean, self._std = channel_stats(pool_images)
        if self.subset is not None:
            chosen, _ = ds.class_balanced_split(
                pool_labels, self.subset, ds.derive_seed("subset", self.seed), self._num_classes
            )
            pool_images, pool_labels = pool_images[chosen], pool_labels[chosen]
        return {
            "train": (pool_images, pool_labels),
            "val": self._conform(val),
            "test": self._conform(test),
        }
