"""Time one training epoch of batches + augmentation: ImageDataModule vs a per-sample pipeline.

CIFAR-100-sized synthetic data (47,500 training images of 3x32x32 after the 2,500 validation
split), batch 100, random crop (padding 4) + horizontal flip + normalisation. The baseline is
the usual torchvision recipe: a Dataset returning PIL images through per-sample transforms,
collated by a DataLoader with worker processes. Both produce normalised float batches on the
CPU; nothing is trained. Usage: python tests/scripts/bench_data_loading.py [--workers 2]
[--threads 1]. On a shared, oversubscribed CPU use --threads 1: OpenMP threads spinning
against other processes make small per-batch ops many times slower.
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from gradtrace.datamodule import ImageDataModule


class PerSampleImages(Dataset):
    """What torchvision.datasets.CIFAR100 does per item: HWC uint8 -> PIL -> transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: object) -> None:
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads of the main process (0: default)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dm = ImageDataModule(
        "synthetic", num_classes=100, synthetic_sizes=(50_000, 10_000), batch_size=args.batch_size
    )
    start = time.perf_counter()
    dm.setup("fit")
    print(f"setup (generate 60,000 images, split, statistics): {time.perf_counter() - start:.2f} s")

    start = time.perf_counter()
    steps = 0
    for batch in dm.train_dataloader():
        dm.transform_batch(batch)
        steps += 1
    ours = time.perf_counter() - start
    print(f"ImageDataModule: {steps} batches in {ours:.2f} s ({steps / ours:.0f} batches/s)")

    images, labels = dm.split("train")
    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(dm.mean.tolist(), dm.std.tolist()),
        ]
    )
    loader = DataLoader(
        PerSampleImages(images, labels, transform),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
    )
    start = time.perf_counter()
    steps = 0
    for _batch in loader:
        steps += 1
    theirs = time.perf_counter() - start
    print(
        f"per-sample DataLoader ({args.workers} workers): {steps} batches in {theirs:.2f} s "
        f"({steps / theirs:.0f} batches/s)"
    )
    print(f"speed-up: {theirs / ours:.1f}x (threads: {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
