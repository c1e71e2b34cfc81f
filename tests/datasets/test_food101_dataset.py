"""`food101` on a fabricated replica of food-101/ (torchvision Food101 layout)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replicas  # noqa: E402

from sparsebench.datasets import DatasetCorruptError, DatasetNotFoundError, create_dataset  # noqa: E402


def test_food101_replica_loads(tmp_path, monkeypatch):
    replicas.allow_partial(monkeypatch)
    replicas.make_food101(tmp_path, n_train=4, n_test=2)
    splits = create_dataset("food101", data_root=str(tmp_path), img_size=32, val_fraction=0.25, split_seed=2)
    replicas.check_splits(splits, num_classes=3, n_train_total=12, n_test=6, img_size=32, val_fraction=0.25)
    assert splits.info.mean == (0.485, 0.456, 0.406)
    assert "Food-101" in splits.info.source


def test_food101_default_resolution_is_224(tmp_path, monkeypatch):
    replicas.allow_partial(monkeypatch)
    replicas.make_food101(tmp_path, n_train=4, n_test=1)
    splits = create_dataset("food101", data_root=str(tmp_path), val_fraction=0.25)
    assert splits.info.img_size == 224
    assert tuple(splits.test[0][0].shape) == (3, 224, 224)
    assert tuple(splits.train[0][0].shape) == (3, 224, 224)


def test_food101_labels_follow_sorted_classes(tmp_path, monkeypatch):
    replicas.allow_partial(monkeypatch)
    base = replicas.make_food101(tmp_path, classes=("waffles", "apple_pie"), n_train=3, n_test=1)
    splits = create_dataset("food101", data_root=str(tmp_path), img_size=16, val_fraction=0.34)
    meta = json.loads((base / "meta" / "test.json").read_text())
    assert [splits.test[i][1] for i in range(len(splits.test))] == [1, 0]     # json order, sorted class ids
    assert list(meta) == ["waffles", "apple_pie"]


def test_food101_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as exc:
        create_dataset("food101", data_root=str(tmp_path))
    replicas.assert_not_found(exc, tmp_path / "food-101")
    assert "--download" in str(exc.value)


def test_food101_full_size_checks_reject_a_partial_copy(tmp_path, monkeypatch):
    monkeypatch.delenv(replicas.PARTIAL_ENV, raising=False)
    replicas.make_food101(tmp_path)
    with pytest.raises(DatasetCorruptError) as exc:
        create_dataset("food101", data_root=str(tmp_path))
    msg = replicas.assert_one_line(exc)
    assert "101" in msg and replicas.PARTIAL_ENV in msg


def _drop_test_json_class(base):
    meta = json.loads((base / "meta" / "test.json").read_text())
    meta.pop("beignets")
    (base / "meta" / "test.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage, expect",
    [
        (lambda b: (b / "images" / "apple_pie" / "1001.jpg").unlink(), "1001.jpg"),
        (lambda b: (b / "meta" / "train.json").write_text("{not json"), "train.json"),
        (lambda b: (b / "meta" / "test.json").unlink(), "test.json"),
        (lambda b: (b / "meta" / "train.json").write_text('["apple_pie/1"]'), "train.json"),
        (_drop_test_json_class, "different classes"),
        (lambda b: (b / "meta" / "classes.txt").write_text("apple_pie\n"), "classes.txt"),
    ],
    ids=["listed-image-missing", "unparseable-json", "no-test-json", "wrong-json-shape", "class-mismatch",
         "classes-txt-mismatch"],
)
def test_food101_corrupt(tmp_path, monkeypatch, damage, expect):
    replicas.allow_partial(monkeypatch)
    base = replicas.make_food101(tmp_path, n_train=2, n_test=1)
    damage(base)
    with pytest.raises(DatasetCorruptError) as exc:
        create_dataset("food101", data_root=str(tmp_path))
    assert expect in replicas.assert_one_line(exc)
