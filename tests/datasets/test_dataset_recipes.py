"""Registration, transform recipes, the partial-data switch and the dataset card."""
import sys
from pathlib import Path

import pytest
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replicas  # noqa: E402

from sparsebench.datasets import DATASETS, create_dataset  # noqa: E402
from sparsebench.datasets._checks import PARTIAL_ENV, partial_data_allowed  # noqa: E402
from sparsebench.datasets.transforms import small_image_transforms, transfer_transforms  # noqa: E402

REAL = ["cifar10", "cifar100", "tiny-imagenet", "food101", "flowers102", "pets", "imagenet"]
CARD = Path(__file__).resolve().parents[2] / "docs" / "datasets.md"


def test_all_real_datasets_are_registered_with_a_description():
    for name in REAL:
        assert name in DATASETS
        assert DATASETS.get(name).description


def _types(compose):
    return [type(t) for t in compose.transforms]


def test_small_image_recipe_at_native_size():
    train, evaluate = small_image_transforms(32, 32)
    assert _types(train) == [T.RandomCrop, T.RandomHorizontalFlip, T.PILToTensor]
    assert train.transforms[0].size == (32, 32) and train.transforms[0].padding == 4
    assert _types(evaluate) == [T.PILToTensor]
    train64, _ = small_image_transforms(64, 64)
    assert train64.transforms[0].padding == 8


def test_small_image_recipe_resizes_when_img_size_overrides():
    train, evaluate = small_image_transforms(32, 48)
    assert _types(train)[0] is T.Resize and train.transforms[1].size == (48, 48)
    assert _types(evaluate)[0] is T.Resize


def test_transfer_recipe():
    train, evaluate = transfer_transforms(224)
    assert _types(train) == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.PILToTensor]
    assert _types(evaluate) == [T.Resize, T.CenterCrop, T.PILToTensor]
    assert evaluate.transforms[0].size == 256 and evaluate.transforms[1].size == (224, 224)
    _, evaluate160 = transfer_transforms(160)
    assert evaluate160.transforms[0].size == int(160 / 0.875)


def test_loaders_use_the_recipes(tmp_path, monkeypatch):
    replicas.allow_partial(monkeypatch)
    replicas.make_cifar10(tmp_path, per_batch=8)
    splits = create_dataset("cifar10", data_root=str(tmp_path), val_fraction=0.25)
    train_view, val_view = splits.train.dataset, splits.val.dataset
    assert train_view.base is val_view.base                  # one copy of the data in memory
    assert isinstance(train_view.transform.transforms[0], T.RandomCrop)
    assert _types(val_view.transform) == [T.PILToTensor]


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("0", False), ("", False)])
def test_partial_switch(monkeypatch, value, expected):
    monkeypatch.setenv(PARTIAL_ENV, value)
    assert partial_data_allowed() is expected


def test_dataset_card_covers_every_dataset():
    text = CARD.read_text()
    for name in REAL:
        assert f"`{name}`" in text
    assert PARTIAL_ENV in text and "split_seed" in text
