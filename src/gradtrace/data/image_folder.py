"""torchvision's ImageFolder layout, every image decoded once and resized into memory."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from gradtrace.data.image_data import DataNotFoundError, ImageData, Split

__all__ = ["image_folder_classes", "image_folder_layout", "read_image_folder"]


def image_folder_layout(path: str | Path) -> dict[str, Path]:
    """The split folders of an ImageFolder tree.

    ``path/train`` (+ optional ``path/val``, ``path/test``) when ``path/train`` exists,
    otherwise ``{"train": path}`` (a flat tree of class folders, split by the data module).
    """
    path = Path(path)
    if not path.is_dir():
        raise DataNotFoundError(
            f"imagefolder path {path} does not exist or is not a folder: check the path after "
            f"imagefolder: (relative paths start from the current folder)"
        )
    if not (path / "train").is_dir():
        return {"train": path}
    return {split: path / split for split in ("train", "val", "test") if (path / split).is_dir()}


def image_folder_classes(path: str | Path) -> list[str]:
    """Class names (sorted sub-folder names of the training folder): a directory listing."""
    from torchvision.datasets.folder import find_classes

    train = image_folder_layout(path)["train"]
    try:
        return find_classes(train)[0]
    except FileNotFoundError as err:
        raise ValueError(
            f"imagefolder path {path} has no class folders: expected <path>/<class>/<image> or "
            f"<path>/train/<class>/<image> (with optional val/ and test/ alike)"
        ) from err


def _load_image(path: str, mode: str, size: tuple[int, int]) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    with Image.open(path) as image:
        converted = image.convert(mode)
    # PIL's bilinear resize widens its filter when shrinking, i.e. it antialiases.
    resized = converted.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return pil_to_tensor(resized)


def read_image_folder(path: str | Path, channels: int, size: tuple[int, int]) -> ImageData:
    """Decode every image of an ImageFolder tree once: RGB (or grey), resized to ``size``.

    Images of ``val/`` or ``test/`` whose class folder is absent from ``train/`` are an error;
    a class folder may be empty in ``val/`` and ``test/``.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    classes = image_folder_classes(path)
    class_to_idx = {name: index for index, name in enumerate(classes)}
    mode = {1: "L", 3: "RGB"}[channels]
    splits: dict[str, Split] = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL releases the GIL
        for split, folder in image_folder_layout(path).items():
            extra = {p.name for p in folder.iterdir() if p.is_dir()} - set(class_to_idx)
            if extra:
                raise ValueError(
                    f"{folder} has class folders that {path} training data lacks: {sorted(extra)}"
                )
            samples = make_dataset(
                str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=split != "train"
            )
            images = list(pool.map(lambda s: _load_image(s[0], mode, size), samples))
            labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
            empty = torch.empty(0, channels, *size, dtype=torch.uint8)
            splits[split] = (torch.stack(images) if images else empty, labels)
    return ImageData(
        train=splits["train"],
        test=splits.get("test"),
        val=splits.get("val"),
        classes=tuple(classes),
    )
