"""Image datasets read into memory as uint8 tensors, and the seeded class-balanced split.

Every source becomes an :class:`ImageData`: per split, uint8 images ``[N, C, H, W]`` and int64
labels ``[N]``. Keeping a whole split in one tensor (CIFAR-100's training set is 150 MB) lets
:class:`gradtrace.ImageDataModule` cut batches by index instead of collating samples.

One module per source (the ``dataset`` argument of the data module, see :data:`DATASETS`):
:mod:`~gradtrace.data.cifar` (``cifar10``, ``cifar100``),
:mod:`~gradtrace.data.fashion_mnist`, :mod:`~gradtrace.data.synthetic` and
:mod:`~gradtrace.data.image_folder` (``imagefolder:<path>``); downloads go through
:mod:`~gradtrace.data.download` (one process at a time per file, verified, atomic).

torchvision (the ``zoo``/``train`` extra) is imported inside the functions that need it, so
importing this package costs only torch.
"""

from gradtrace.data.cifar import (
    CifarArchive,
    cifar_archive,
    cifar_missing_message,
    download_cifar,
    read_cifar,
)
from gradtrace.data.download import DownloadError, download_verified, md5_of, verify_md5
from gradtrace.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_SYSTEM_DIR,
    download_fashion_mnist,
    fashion_mnist_dirs,
    fashion_mnist_missing_message,
    fashion_mnist_train_size,
    find_fashion_mnist,
    locate_fashion_mnist,
    read_fashion_mnist,
    read_idx,
)
from gradtrace.data.image_data import (
    DATASETS,
    ChecksumError,
    DataNotFoundError,
    ImageData,
    Split,
    class_balanced_split,
    derive_seed,
    parse_dataset,
)
from gradtrace.data.image_folder import (
    image_folder_classes,
    image_folder_layout,
    read_image_folder,
)
from gradtrace.data.synthetic import read_synthetic, synthetic_images, synthetic_templates

__all__ = [
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_SYSTEM_DIR",
    "ChecksumError",
    "CifarArchive",
    "DataNotFoundError",
    "DownloadError",
    "ImageData",
    "Split",
    "cifar_archive",
    "cifar_missing_message",
    "class_balanced_split",
    "derive_seed",
    "download_cifar",
    "download_fashion_mnist",
    "download_verified",
    "fashion_mnist_dirs",
    "fashion_mnist_missing_message",
    "fashion_mnist_train_size",
    "find_fashion_mnist",
    "image_folder_classes",
    "image_folder_layout",
    "locate_fashion_mnist",
    "md5_of",
    "parse_dataset",
    "read_cifar",
    "read_fashion_mnist",
    "read_idx",
    "read_image_folder",
    "read_synthetic",
    "synthetic_images",
    "synthetic_templates",
    "verify_md5",
]
