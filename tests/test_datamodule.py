"""ImageDataModule: what it knows before setup, the split, batches, augmentation, DDP, resume."""

from __future__ import annotations

import hashlib
import itertools
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import Precision
from torchvision.transforms.v2 import functional as tvf

import gradtrace.data as ds
from gradtrace.data import fashion_mnist
from gradtrace.data.augmentation import crop_flip, sample_crops
from gradtrace.data.batches import (
    EvalBatches,
    TrainBatches,
    eval_batch_bounds,
    train_batch_indices,
)
from gradtrace.data.datamodule import ImageDataModule
from helpers.data_files import write_cifar_archive, write_fashion_mnist, write_image_folder

SMALL = {
    "dataset": "synthetic",
    "synthetic_sizes": (600, 100),
    "val_size": 100,
    "batch_size": 50,
    "augment": "crop_flip",
}


def rows(images: torch.Tensor) -> list[bytes]:
    """Each image's bytes: identifies an image independently of where a split put it."""
    return [hashlib.sha1(image.numpy().tobytes()).digest() for image in images]


def fake_trainer(world_size: int = 1, rank: int = 0, epoch: int = 0) -> SimpleNamespace:
    """What the data module reads from a Trainer, for sharding checks without processes."""
    return SimpleNamespace(
        world_size=world_size,
        global_rank=rank,
        current_epoch=epoch,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        precision_plugin=Precision(),
    )


def reference_crop_flip(images: torch.Tensor, crops: torch.Tensor, padding: int) -> torch.Tensor:
    """Per-sample torchvision: pad with zeros, crop at (top, left), flip: the independent check."""
    height, width = images.shape[-2:]
    out = []
    for image, (top, left, flip) in zip(images, crops.tolist()):
        cropped = tvf.crop(tvf.pad(image, [padding]), top, left, height, width)
        out.append(tvf.horizontal_flip(cropped) if flip else cropped)
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# Before setup


def test_properties_before_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    dm = ImageDataModule("synthetic")
    assert (dm.num_classes, dm.num_channels, dm.image_size) == (10, 3, (32, 32))
    dm = ImageDataModule("synthetic", num_classes=7, channels=1, image_size=(20, 28))
    assert (dm.num_classes, dm.num_channels, dm.image_size) == (7, 1, (20, 28))
    assert ImageDataModule("cifar100").num_classes == 100
    assert ImageDataModule("cifar10", image_size=64).image_size == (64, 64)
    write_fashion_mnist(tmp_path / "fm", 200, 20)
    dm = ImageDataModule("fashion_mnist", root=str(tmp_path / "fm"), val_size=20, download=False)
    assert (dm.num_classes, dm.num_channels, dm.image_size) == (10, 1, (32, 32))
    dm = ImageDataModule("fashion_mnist", root=str(tmp_path / "fm"), val_size=20, channels=3)
    assert dm.num_channels == 3
    write_image_folder(tmp_path / "pets", per_class=2, sizes=((8, 8),))
    dm = ImageDataModule(f"imagefolder:{tmp_path / 'pets'}", val_size=1, test_size=1, batch_size=1)
    assert (dm.num_classes, dm.num_channels, dm.image_size) == (3, 3, (32, 32))
    assert dm.classes == ("class_0", "class_1", "class_2")  # a directory listing, no decoding
    with pytest.raises(RuntimeError, match=r"setup\(\) has not run yet"):
        dm.split("train")


def bad_inputs(tmp: Path) -> list[tuple[dict, type[Exception], str]]:
    syn = {"dataset": "synthetic", "synthetic_sizes": (1000, 100), "val_size": 100}
    return [
        (
            {"dataset": "imagenet"},
            ValueError,
            r"dataset must be one of cifar10, cifar100, fashion_mnist, synthetic, "
            r"imagefolder:<path>; got 'imagenet'",
        ),
        ({**syn, "batch_size": 0}, ValueError, r"batch_size must be an integer >= 1; got 0"),
        ({**syn, "batch_size": 2.5}, ValueError, r"batch_size must be an integer >= 1; got 2.5"),
        ({**syn, "eval_batch_size": 0}, ValueError, r"eval_batch_size must be an integer >= 1 or"),
        ({**syn, "val_size": -1}, ValueError, r"val_size must be an integer >= 0; got -1"),
        ({**syn, "seed": -3}, ValueError, r"seed must be an integer >= 0; got -3"),
        (
            {**syn, "val_size": 950},
            ValueError,
            r"val_size must be at most 900 for synthetic: it has 1000 training images and one "
            r"global batch \(100\) must remain for training; got val_size=950",
        ),
        (
            {"dataset": "cifar100", "val_size": 50_000},
            ValueError,
            r"val_size must be at most 49900 for cifar100: it has 50000 training images",
        ),
        (
            {**syn, "subset": 901},
            ValueError,
            r"subset must be between 100 \(one global batch\) and 900 \(the training split of "
            r"synthetic\); got 901",
        ),
        ({**syn, "subset": 99}, ValueError, r"subset must be between 100 .*; got 99"),
        ({**syn, "channels": 2}, ValueError, r"channels must be one of 1, 3 or None; got 2"),
        ({**syn, "image_size": (0, 3)}, ValueError, r"image_size must be an integer or \(H, W\)"),
        ({**syn, "num_classes": 1}, ValueError, r"num_classes must be an integer >= 2 or None"),
        (
            {"dataset": "cifar10", "num_classes": 100},
            ValueError,
            r"num_classes is set by the data for cifar10 \(10 classes\); leave it unset",
        ),
        ({**syn, "md5": "0" * 32}, ValueError, r"md5 only applies to cifar10 and cifar100"),
        ({"dataset": "cifar10", "md5": "xyz"}, ValueError, r"md5 must be 32 lowercase hex digits"),
        (
            {"dataset": "cifar10", "test_size": 10},
            ValueError,
            r"test_size only applies to an imagefolder tree without train/",
        ),
        (
            {"dataset": "synthetic", "synthetic_sizes": (10,)},
            ValueError,
            r"synthetic_sizes must be two integers >= 1 \(training pool, test\)",
        ),
        (
            {"dataset": "cifar100", "root": str(tmp / "nowhere"), "download": False},
            FileNotFoundError,
            r"cifar100 needs cifar-100-python.tar.gz \(MD5 eb9058c3a382ffc7106e4002c42a8d85\) at "
            r".*nowhere/cifar-100-python.tar.gz: download it from https://",
        ),
        (
            {"dataset": "fashion_mnist", "root": str(tmp / "nowhere"), "download": False},
            FileNotFoundError,
            r"Fashion-MNIST not found: looked in .*nowhere.*downloads are off",
        ),
        (
            {"dataset": f"imagefolder:{tmp / 'missing'}"},
            FileNotFoundError,
            r"imagefolder path .*missing does not exist",
        ),
        ({"dataset": f"imagefolder:{tmp}"}, ValueError, r"has no class folders"),
    ]


def test_bad_inputs_fail_in_init_with_the_valid_choices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    for kwargs, error, message in bad_inputs(tmp_path):
        with pytest.raises(error, match=message):
            ImageDataModule(**kwargs)


def test_sizes_checked_against_the_loaded_data(tmp_path: Path) -> None:
    # With a custom checksum the archive's size is only known once read: setup() checks it.
    _, md5, _ = write_cifar_archive(tmp_path, "cifar10", 300, 50)
    dm = ImageDataModule("cifar10", root=str(tmp_path), md5=md5, val_size=250, download=False)
    with pytest.raises(ValueError, match=r"val_size must be at most 200 for cifar10: it has 300"):
        dm.setup("fit")
    # ...and under DDP the global batch (batch_size x world size) must fit too.
    dm = ImageDataModule(**{**SMALL, "subset": 60})
    dm.trainer = fake_trainer(world_size=2)
    with pytest.raises(ValueError, match=r"subset must be between 100 \(one global batch\)"):
        dm.setup("fit")


# ---------------------------------------------------------------------------------------------
# The coursework split


def test_split_sizes_balance_and_provenance() -> None:
    kwargs = {"dataset": "synthetic", "num_classes": 100, "synthetic_sizes": (2000, 300)}
    dm = ImageDataModule(**kwargs, val_size=200)
    dm.setup("fit")
    (train, train_labels), (val, val_labels) = dm.split("train"), dm.split("val")
    test, test_labels = dm.split("test")
    assert (len(train), len(val), len(test)) == (1800, 200, 300)
    assert torch.bincount(train_labels, minlength=100).tolist() == [18] * 100
    assert torch.bincount(val_labels, minlength=100).tolist() == [2] * 100
    pool = ds.read_synthetic(100, 3, (32, 32), (2000, 300))
    assert sorted(rows(train) + rows(val)) == sorted(rows(pool.train[0]))  # a partition
    assert torch.equal(test, pool.test[0])  # the official test set, untouched
    assert torch.equal(test_labels, pool.test[1])

    same = ImageDataModule(**kwargs, val_size=200)
    same.setup("fit")
    assert torch.equal(same.split("val")[0], val)
    other = ImageDataModule(**kwargs, val_size=200, seed=1)
    other.setup("fit")
    assert set(rows(other.split("val")[0])) != set(rows(val))
    assert torch.bincount(other.split("val")[1], minlength=100).tolist() == [2] * 100


def test_subset_is_class_balanced_and_leaves_val_and_test_alone() -> None:
    kwargs = {"dataset": "synthetic", "synthetic_sizes": (2000, 300), "val_size": 200}
    full, sub = ImageDataModule(**kwargs), ImageDataModule(**kwargs, subset=500)
    full.setup("fit")
    sub.setup("fit")
    images, labels = sub.split("train")
    assert torch.bincount(labels).tolist() == [50] * 10
    assert set(rows(images)) <= set(rows(full.split("train")[0]))
    for name in ("val", "test"):
        assert torch.equal(sub.split(name)[0], full.split(name)[0])
    assert torch.equal(sub.mean, full.mean)  # normalisation from the whole training split
    assert len(sub.train_dataloader()) == 500 // 100


def test_cifar_through_the_data_module(tmp_path: Path) -> None:
    _, md5, written = write_cifar_archive(tmp_path, "cifar100", 1000, 200)
    dm = ImageDataModule(
        "cifar100", root=str(tmp_path), md5=md5, val_size=500, batch_size=25, download=False
    )
    dm.prepare_data()
    dm.setup("fit")
    assert torch.bincount(dm.split("train")[1], minlength=100).tolist() == [5] * 100
    assert torch.bincount(dm.split("val")[1], minlength=100).tolist() == [5] * 100
    assert dm.split("test")[0].shape == (200, 3, 32, 32)
    assert dm.classes[42] == "c100_42"
    pool = torch.from_numpy(written["train"][0]).view(-1, 3, 32, 32)
    assert sorted(rows(dm.split("train")[0]) + rows(dm.split("val")[0])) == sorted(rows(pool))


def test_cifar_converted_to_grey_and_resized(tmp_path: Path) -> None:
    _, md5, written = write_cifar_archive(tmp_path, "cifar10", 200, 30)
    kwargs = {"root": str(tmp_path), "md5": md5, "val_size": 100, "channels": 1}
    dm = ImageDataModule("cifar10", **kwargs)
    dm.setup("fit")
    grey = dm.split("test")[0]
    rgb = torch.from_numpy(written["test"][0]).view(-1, 3, 32, 32).double()
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]  # ITU-R 601-2
    assert grey.shape == (30, 1, 32, 32)
    assert (grey[:, 0].double() - luma).abs().max() < 1.5  # torchvision truncates
    small = ImageDataModule("cifar10", **kwargs, image_size=(16, 8))
    small.setup("fit")
    assert small.split("test")[0].shape == (30, 1, 16, 8)
    assert small.split("test")[0].dtype == torch.uint8


def test_fashion_mnist_through_the_data_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    written = write_fashion_mnist(tmp_path, 300, 40)
    dm = ImageDataModule("fashion_mnist", root=str(tmp_path), val_size=100, channels=3)
    dm.setup("fit")
    images, _ = dm.split("test")
    assert images.shape == (40, 3, 32, 32)
    assert torch.equal(images[:, 0], images[:, 2])  # grey repeated into three channels
    assert torch.equal(images[:, 1, 2:30, 2:30], torch.from_numpy(written["test"][0]))
    assert torch.bincount(dm.split("val")[1]).tolist() == [10] * 10


def test_image_folder_through_the_data_module(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "flat", per_class=10, sizes=((40, 30), (12, 12)))
    dm = ImageDataModule(
        f"imagefolder:{tmp_path / 'flat'}", val_size=3, test_size=6, batch_size=7, image_size=16
    )
    dm.setup("fit")
    assert torch.bincount(dm.split("test")[1]).tolist() == [2, 2, 2]
    assert torch.bincount(dm.split("val")[1]).tolist() == [1, 1, 1]
    assert torch.bincount(dm.split("train")[1]).tolist() == [7, 7, 7]
    assert dm.split("train")[0].shape[1:] == (3, 16, 16)

    write_image_folder(tmp_path / "tree" / "train", per_class=4, sizes=((16, 16),))
    write_image_folder(tmp_path / "tree" / "val", per_class=1, sizes=((16, 16),))
    dm = ImageDataModule(f"imagefolder:{tmp_path / 'tree'}", batch_size=4)
    dm.setup("fit")
    assert len(dm.split("train")[1]) == 12  # val/ is the validation split: nothing carved
    assert dm.split("val")[1].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"has train/ but no test/ folder, so there is no test"):
        dm.test_dataloader()


# ---------------------------------------------------------------------------------------------
# Batches


def index_batches(n: int, batch_size: int, **kwargs: object) -> TrainBatches:
    """Training batches over images that are their own index (labels = index)."""
    return TrainBatches(
        torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n), batch_size, seed=0, **kwargs
    )


def test_train_batches_drop_last_and_cover_each_epoch() -> None:
    batches = index_batches(1003, 50, augment=False)
    assert len(batches) == 20
    epoch0 = [labels for _, labels in batches]
    assert len(epoch0) == 20
    assert all(len(labels) == 50 for labels in epoch0)
    seen = torch.cat(epoch0)
    assert len(set(seen.tolist())) == 1000  # no repeats; 3 left over, dropped
    assert torch.equal(torch.cat([labels for _, labels in batches]), seen)  # replayable
    batches.set_epoch(1)
    epoch1 = torch.cat([labels for _, labels in batches])
    assert not torch.equal(epoch1, seen)
    assert not torch.equal(epoch1, epoch1.sort().values)  # shuffled, not sorted


def test_train_batches_carry_their_crops() -> None:
    batches = index_batches(300, 50, padding=3)
    batches.set_epoch(4)
    for step, (images, labels, crops) in enumerate(batches):
        assert torch.equal(crops, sample_crops(0, 4, step, 50, 3))
        assert images.shape == (50, 1, 2, 2)
        assert labels.shape == (50,)


def test_sample_crops_range_and_determinism() -> None:
    crops = sample_crops(seed=1, epoch=2, step=3, num_images=4000, padding=4)
    assert crops.shape == (4000, 3)
    assert crops.dtype == torch.int64
    assert crops[:, :2].min() == 0
    assert crops[:, :2].max() == 8
    assert set(crops[:, 2].tolist()) == {0, 1}
    assert torch.equal(crops, sample_crops(1, 2, 3, 4000, 4))
    for other in ((0, 2, 3), (1, 1, 3), (1, 2, 4)):
        assert not torch.equal(crops, sample_crops(*other, num_images=4000, padding=4))
    state = torch.random.get_rng_state()
    sample_crops(1, 2, 3, 10, 4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is not touched


@pytest.mark.parametrize("padding", [0, 1, 4])
def test_crop_flip_matches_per_sample_torchvision(padding: int) -> None:
    images = torch.randint(0, 256, (64, 3, 12, 10), dtype=torch.uint8)  # H != W on purpose
    crops = sample_crops(0, 0, 0, 64, padding)
    crops[0] = torch.tensor([0, 0, 1])  # the extreme corners, flipped and not
    crops[1] = torch.tensor([2 * padding, 2 * padding, 0])
    assert torch.equal(
        crop_flip(images, crops, padding), reference_crop_flip(images, crops, padding)
    )


def test_train_batch_indices_world2_equals_world1_double_batch() -> None:
    order = torch.randperm(1037)
    single = train_batch_indices(order, batch_size=100, world_size=1)
    rank0 = train_batch_indices(order, batch_size=50, world_size=2, rank=0)
    rank1 = train_batch_indices(order, batch_size=50, world_size=2, rank=1)
    assert single.shape == (10, 100)
    assert rank0.shape == rank1.shape == (10, 50)
    assert torch.equal(torch.cat([rank0, rank1], dim=1), single)
    assert not set(rank0.flatten().tolist()) & set(rank1.flatten().tolist())


def test_train_batches_world2_equal_world1_double_batch() -> None:
    single = list(index_batches(1037, 100))
    ranks = [list(index_batches(1037, 50, world_size=2, rank=r)) for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 10
    for one, r0, r1 in zip(single, *ranks):
        for part in (1, 2):  # labels (= image index) and crops
            assert torch.equal(torch.cat([r0[part], r1[part]]), one[part])


@pytest.mark.parametrize(("n", "world_size"), [(1013, 2), (1000, 2), (1013, 3), (301, 3)])
def test_eval_shards_cover_every_image_once(n: int, world_size: int) -> None:
    per_rank = [eval_batch_bounds(n, 100, world_size, r) for r in range(world_size)]
    seen = [i for bounds in per_rank for start, stop in bounds for i in range(start, stop)]
    assert sorted(seen) == list(range(n))
    sizes = [sum(stop - start for start, stop in bounds) for bounds in per_rank]
    assert max(sizes) - min(sizes) <= 1
    single = eval_batch_bounds(n, 100 * world_size, 1, 0)
    for step, (start, stop) in enumerate(single):  # rank slices of a global batch, in order
        parts = [bounds[step] for bounds in per_rank if step < len(bounds)]
        assert parts[0][0] == start
        assert parts[-1][1] == stop
        assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
    counts = [len(bounds) for bounds in per_rank]
    if n % (100 * world_size) >= world_size or n % (100 * world_size) == 0:
        assert len(set(counts)) == 1  # same number of steps on every rank
    else:  # 301 images, 3 ranks: one image is left for the last step; only rank 0 gets it
        assert counts == [2, 1, 1]


def test_eval_batches_are_views_in_order() -> None:
    images = torch.randint(0, 256, (250, 3, 4, 4), dtype=torch.uint8)
    batches = list(EvalBatches(images, torch.arange(250), 100))
    assert [len(labels) for _, labels in batches] == [100, 100, 50]
    assert torch.equal(torch.cat([x for x, _ in batches]), images)
    assert batches[0][0].data_ptr() == images.data_ptr()  # no copy


def test_data_module_shards_by_trainer_rank() -> None:
    single = ImageDataModule(**{**SMALL, "batch_size": 100})
    single.setup("fit")
    ranks = []
    for rank in (0, 1):
        dm = ImageDataModule(**SMALL)
        dm.trainer = fake_trainer(world_size=2, rank=rank, epoch=3)
        dm.setup("fit")
        ranks.append(dm)
    single.trainer = fake_trainer(epoch=3)
    pairs = zip(single.train_dataloader(), *(dm.train_dataloader() for dm in ranks))
    for one, r0, r1 in pairs:
        for part in range(3):
            assert torch.equal(torch.cat([r0[part], r1[part]]), one[part])
        # ...and the augmented, normalised batches agree too
        x0, x1 = ranks[0].transform_batch(r0)[0], ranks[1].transform_batch(r1)[0]
        assert torch.equal(torch.cat([x0, x1]), single.transform_batch(one)[0])
    val = [torch.cat([y for _, y in dm.val_dataloader()]) for dm in ranks]
    assert sorted(torch.cat(val).tolist()) == sorted(single.split("val")[1].tolist())


# ---------------------------------------------------------------------------------------------
# Normalisation and on_after_batch_transfer


def test_mean_std_are_the_training_split_statistics() -> None:
    dm = ImageDataModule(**SMALL)
    dm.setup("fit")
    pixels = dm.split("train")[0].double().div(255).transpose(0, 1).flatten(1)
    torch.testing.assert_close(dm.mean, pixels.mean(1).float())
    torch.testing.assert_close(dm.std, pixels.std(1, unbiased=False).float())


def test_on_after_batch_transfer_augments_training_batches_only() -> None:
    dm = ImageDataModule(**SMALL, crop_padding=2)
    dm.setup("fit")
    mean, std = dm.mean.view(1, 3, 1, 1), dm.std.view(1, 3, 1, 1)
    images, labels, crops = next(iter(dm.train_dataloader()))
    x, y = dm.on_after_batch_transfer((images, labels, crops), 0)
    expected = (reference_crop_flip(images, crops, 2).double() / 255 - mean) / std
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, expected.float())
    assert torch.equal(y, labels)
    images, labels = next(iter(dm.val_dataloader()))
    x, _ = dm.on_after_batch_transfer((images, labels), 0)
    torch.testing.assert_close(x, ((images.double() / 255 - mean) / std).float())
    x_all, _ = dm.transform_batch(dm.split("train"))
    torch.testing.assert_close(x_all.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_all.std((0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)


def test_augment_false_yields_plain_batches() -> None:
    dm = ImageDataModule(**{**SMALL, "augment": False})
    assert dm.augment == "none"
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 2
    assert len(dm.predict_dataloader()) == 2  # the test split, 100 images in batches of 50


def test_augment_defaults_fit_the_data(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "pets", per_class=2, sizes=((8, 8),))
    folder = {"dataset": f"imagefolder:{tmp_path / 'pets'}", "val_size": 1, "test_size": 1}
    assert ImageDataModule("cifar100").augment == "crop_flip"  # the coursework's
    assert ImageDataModule("cifar10").augment == "crop_flip"
    assert ImageDataModule("synthetic").augment == "none"
    assert ImageDataModule(**folder, batch_size=1).augment == "none"  # unknown content
    assert ImageDataModule(**folder, batch_size=1, augment=True).augment == "crop_flip"
    assert ImageDataModule("cifar100", augment=False).augment == "none"
    dm = ImageDataModule("cifar100", augment="crop")
    assert (dm.augment, dm.hparams["augment"]) == ("crop", "crop")  # printed with the settings
    with pytest.raises(
        ValueError, match=r"augment must be one of none, crop, crop_flip; got 'flip'"
    ):
        ImageDataModule("cifar100", augment="flip")


def test_the_settings_used_are_described_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    dm = ImageDataModule(**{**SMALL, "augment": "crop"}, normalization="cifar10")
    with caplog.at_level("INFO", logger="gradtrace.data.datamodule"):
        dm.setup("fit")
        dm.setup("validate")  # loaded once, said once
    assert caplog.messages == [
        "Data: synthetic: 500 train, 100 val, 100 test images of 3x32x32; augment crop; "
        "normalization cifar10"
    ]


def test_crop_only_never_flips_and_crops_like_crop_flip() -> None:
    cropped = ImageDataModule(**{**SMALL, "augment": "crop"}, crop_padding=2)
    flipped = ImageDataModule(**SMALL, crop_padding=2)
    for dm in (cropped, flipped):
        dm.setup("fit")
    images, labels, crops = next(iter(cropped.train_dataloader()))
    _, _, crops_flip = next(iter(flipped.train_dataloader()))
    assert int(crops[:, 2].sum()) == 0
    assert int(crops_flip[:, 2].sum()) > 0
    assert torch.equal(crops[:, :2], crops_flip[:, :2])
    x, _ = cropped.transform_batch((images, labels, crops))
    mean, std = cropped.mean.view(1, 3, 1, 1), cropped.std.view(1, 3, 1, 1)
    expected = (reference_crop_flip(images, crops, 2).double() / 255 - mean) / std
    torch.testing.assert_close(x, expected.float())


def test_cifar10_normalization_uses_the_coursework_constants() -> None:
    dm = ImageDataModule(**SMALL, normalization="cifar10")
    dm.setup("fit")
    torch.testing.assert_close(dm.mean, torch.tensor([0.4914, 0.4822, 0.4465]))
    torch.testing.assert_close(dm.std, torch.tensor([0.2023, 0.1994, 0.2010]))
    images, labels = next(iter(dm.val_dataloader()))
    x, _ = dm.transform_batch((images, labels))
    expected = (images.double() / 255 - dm.mean.view(1, 3, 1, 1)) / dm.std.view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected.float())
    with pytest.raises(ValueError, match="normalization cifar10 needs 3 channels"):
        ImageDataModule(**SMALL, channels=1, normalization="cifar10")
    with pytest.raises(
        ValueError, match="normalization must be one of split, cifar10; got 'imagenet'"
    ):
        ImageDataModule(**SMALL, normalization="imagenet")


# ---------------------------------------------------------------------------------------------
# Under a real Trainer: epochs, order, resume


class Recorder(L.LightningModule):
    """Records what each training step receives; fails on request to simulate a crash."""

    def __init__(self, num_classes: int = 10, fail_at: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters("num_classes")
        self.layer = torch.nn.Linear(3, num_classes)
        self.fail_at = fail_at
        self.seen: list[tuple[int, int, list[int], float]] = []
        self.val_labels: list[torch.Tensor] = []

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        if (self.current_epoch, batch_idx) == self.fail_at:
            raise RuntimeError("simulated fault")
        x, y = batch
        self.seen.append((self.current_epoch, batch_idx, y.tolist(), x.double().sum().item()))
        return F.cross_entropy(self.layer(x.mean((2, 3))), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.val_labels.append(batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(model: Recorder, dm: ImageDataModule, root: Path, epochs: int, **kwargs: object) -> None:
    options = {
        "max_epochs": epochs,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": root,
    }
    trainer = L.Trainer(**{**options, **kwargs})
    trainer.fit(
        model, datamodule=dm, ckpt_path="last" if (root / "ck" / "last.ckpt").exists() else None
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Recorder, ImageDataModule]:
    """A 2-epoch run, with a logger: the reference for the order and resume tests."""
    root = tmp_path_factory.mktemp("uninterrupted")
    dm, model = ImageDataModule(**SMALL), Recorder()
    # With a logger, Lightning merges the model's and the data module's hparams and refuses
    # differing values of a shared key: num_classes is saved resolved (10, not None).
    fit(model, dm, root, epochs=2, logger=CSVLogger(root))
    return model, dm


def test_trainer_sees_the_documented_batches(
    uninterrupted: tuple[Recorder, ImageDataModule],
) -> None:
    model, dm = uninterrupted
    assert dm.hparams.num_classes == 10
    assert dm.hparams.image_size == (32, 32)
    assert [(e, i) for e, i, _, _ in model.seen] == [(e, i) for e in (0, 1) for i in range(10)]
    reference = ImageDataModule(**SMALL)
    reference.setup("fit")
    expected = []
    for epoch in (0, 1):
        batches = reference.train_dataloader()
        batches.set_epoch(epoch)
        for step, batch in enumerate(batches):
            x, y = reference.transform_batch(batch)
            expected.append((epoch, step, y.tolist(), x.double().sum().item()))
    assert model.seen == expected
    val = torch.cat(model.val_labels)
    assert torch.equal(val, torch.cat([dm.split("val")[1]] * 2))  # in order, every epoch


@pytest.mark.parametrize("every_n_steps", [None, 3], ids=["epoch-end", "mid-epoch"])
def test_resumed_run_replays_the_uninterrupted_batches(
    tmp_path: Path, uninterrupted: tuple[Recorder, ImageDataModule], every_n_steps: int | None
) -> None:
    def checkpoint() -> ModelCheckpoint:
        return ModelCheckpoint(
            dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=every_n_steps
        )

    crashed = Recorder(fail_at=(1, 7))
    with pytest.raises(RuntimeError, match="simulated fault"):
        fit(crashed, ImageDataModule(**SMALL), tmp_path, epochs=2, callbacks=[checkpoint()])
    resumed = Recorder()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dataloader is not resumable.*")
        fit(resumed, ImageDataModule(**SMALL), tmp_path, epochs=2, callbacks=[checkpoint()])
    first = resumed.seen[0][:2]
    # epoch-end checkpoints restart epoch 1; with one every 3 steps the last is at global
    # step 15 (epoch 1, after batch 4) and the run continues at batch 5
    assert first == ((1, 0) if every_n_steps is None else (1, 5))
    assert resumed.seen == [s for s in uninterrupted[0].seen if s[:2] >= first]


# ---------------------------------------------------------------------------------------------
# Where the splits live


def gpu_trainer(rank: int = 0) -> SimpleNamespace:
    """A Trainer on ``cuda:0`` as the data module sees it (nothing touches a GPU: the tests
    answer the memory query and record the copies)."""
    trainer = fake_trainer(world_size=2, rank=rank)
    trainer.strategy.root_device = torch.device("cuda", 0)
    return trainer


# SMALL's splits: 500 + 100 + 100 uint8 images of 3x32x32 and as many int64 labels
SMALL_SPLIT_BYTES = 700 * 3 * 32 * 32 + 700 * 8


def record_copies(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    """The CUDA devices tensors are copied to with ``.to(device)`` (those copies skipped)."""
    copies: list[torch.device] = []
    to_ = torch.Tensor.to

    def to(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        device = args[0] if args else kwargs.get("device")
        if isinstance(device, torch.device) and device.type == "cuda":
            copies.append(device)
            return tensor
        return to_(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    return copies


@pytest.mark.parametrize("rank", [0, 1])
def test_splits_stay_on_the_host_when_they_need_over_half_the_free_gpu_memory(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, rank: int
) -> None:
    free = 2 * SMALL_SPLIT_BYTES - 1  # half of it is one byte short
    queried: list[torch.device] = []
    monkeypatch.setattr(
        torch.cuda, "mem_get_info", lambda device: queried.append(device) or (free, 8 * free)
    )
    dm = ImageDataModule(**SMALL)
    dm.trainer = gpu_trainer(rank)
    with caplog.at_level("INFO", logger="gradtrace.data.datamodule"):
        dm.setup("fit")
        copies = record_copies(monkeypatch)
        dm.setup("validate")  # said once
    assert queried == [torch.device("cuda", 0)] * 2
    assert copies == []
    assert dm.split("train")[0].device.type == "cpu"
    said = [m for m in caplog.messages if "host memory" in m]
    assert said == (
        []
        if rank
        else [
            "Data: the splits stay in host memory and each batch is copied to cuda:0: they take "
            f"{SMALL_SPLIT_BYTES / 2**30:.3g} GiB, more than 50% of the {free / 2**30:.3g} GiB "
            "free there (device_resident=true puts them on the GPU anyway)"
        ]
    )


def test_splits_go_to_the_gpu_when_they_fit_or_when_asked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    free = 2 * SMALL_SPLIT_BYTES  # exactly half
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 8 * free))
    dm = ImageDataModule(**SMALL)
    dm.setup("fit")  # loaded without a trainer: on the host
    dm.trainer = gpu_trainer()
    copies = record_copies(monkeypatch)
    with caplog.at_level("INFO", logger="gradtrace.data.datamodule"):
        dm.setup("fit")
    assert copies == [torch.device("cuda", 0)] * 6  # images and labels of three splits
    assert not [m for m in caplog.messages if "host memory" in m]
    # device_resident=True: whatever the free memory (not even asked)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (0, 0))
    forced = ImageDataModule(**SMALL, device_resident=True)
    forced.setup("fit")
    forced.trainer = gpu_trainer()
    copies.clear()
    forced.setup("fit")
    assert copies == [torch.device("cuda", 0)] * 6


# ---------------------------------------------------------------------------------------------
# Real data and GPU


@pytest.mark.slow
def test_real_fashion_mnist_from_debian(tmp_path: Path) -> None:
    if ds.find_fashion_mnist(tmp_path) != ds.FASHION_MNIST_SYSTEM_DIR:
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    data = ds.read_fashion_mnist(tmp_path)
    (train, train_labels), (test, test_labels) = data.train, data.test
    assert train.shape == (60_000, 1, 32, 32)
    assert test.shape == (10_000, 1, 32, 32)
    assert torch.bincount(train_labels).tolist() == [6000] * 10
    assert torch.bincount(test_labels).tolist() == [1000] * 10
    for images in (train, test):
        assert int(images[:, :, :2].count_nonzero()) == 0
        assert int(images[:, :, :, -2:].count_nonzero()) == 0
    assert train[:, :, 2:30, 2:30].float().mean() > 50  # real clothes, not blank padding
    dm = ImageDataModule("fashion_mnist", root=str(tmp_path), download=False)
    dm.setup("fit")
    assert [len(dm.split(s)[1]) for s in ("train", "val", "test")] == [57_500, 2500, 10_000]
    assert torch.bincount(dm.split("val")[1]).tolist() == [250] * 10


@pytest.mark.gpu
def test_cuda_device_resident_batches(tmp_path: Path) -> None:
    dm, model = ImageDataModule(**SMALL), Recorder()
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert dm.split("train")[0].device.type == "cuda"
    images, labels, crops = next(iter(dm.train_dataloader()))  # epoch trainer.current_epoch
    assert images.device.type == "cuda"
    assert torch.equal(crop_flip(images, crops.cuda(), 4).cpu(), crop_flip(images.cpu(), crops, 4))
    x, _ = dm.transform_batch((images, labels, crops))
    assert x.device.type == "cuda"
    reference = ImageDataModule(**SMALL)
    reference.setup("fit")
    batches = reference.train_dataloader()
    batches.set_epoch(trainer.current_epoch)
    x_cpu, _ = reference.transform_batch(next(iter(batches)))
    torch.testing.assert_close(x.cpu(), x_cpu)
