"""Named datasets: the embedded offline default plus the real benchmark datasets."""
from sparsebench.datasets.base import (
    DATASETS,
    DataError,
    DatasetCorruptError,
    DatasetInfo,
    DatasetNotFoundError,
    DatasetSplits,
    LoadedSplits,
    create_dataset,
    default_data_root,
    register_dataset,
)
from sparsebench.datasets import digits  # noqa: F401  (registers "digits")
from sparsebench.datasets import cifar  # noqa: F401  (registers "cifar10", "cifar100")
from sparsebench.datasets import tiny_imagenet  # noqa: F401  (registers "tiny-imagenet")
from sparsebench.datasets import transfer  # noqa: F401  (registers "food101", "flowers102", "pets")
from sparsebench.datasets import imagenet  # noqa: F401  (registers "imagenet")

__all__ = [
    "DATASETS", "DataError", "DatasetCorruptError", "DatasetInfo", "DatasetNotFoundError",
    "DatasetSplits", "LoadedSplits", "create_dataset", "default_data_root", "register_dataset",
]
