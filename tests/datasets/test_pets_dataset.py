"""`pets` on a fabricated replica of oxford-iiit-pet/ (torchvision OxfordIIITPet layout)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replicas  # noqa: E402

from sparsebench.datasets import DatasetCorruptError, DatasetNotFoundError, create_dataset  # noqa: E402


def test_pets_replica_loads_trainval_as_train(tmp_path, monkeypatch):
    replicas.allow_partial(monkeypatch)
    replicas.make_pets(tmp_path, n_trainval=3, n_test=2)
    splits = create_dataset("pets", data_root=str(tmp_path), img_size=32, val_fraction=0.34, split_seed=5)
    replicas.check_splits(splits, num_classes=3, n_train_total=9, n_test=6, img_size=32, val_fraction=0.34)
    assert "CC BY-SA" in splits.info.source


def test_pets_labels_come_from_annotations(tmp_path, monkeypatch):
    replicas.allow_partial(monkeypatch)
    base = replicas.make_pets(tmp_path)
    splits = create_dataset("pets", data_root=str(tmp_path), img_size=16, val_fraction=0.34)
    expected = [int(line.split()[1]) - 1 for line in (base / "annotations" / "test.txt").read_text().splitlines()]
    assert [splits.test[i][1] for i in range(len(splits.test))] == expected


def test_pets_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as exc:
        create_dataset("pets", data_root=str(tmp_path))
    replicas.assert_not_found(exc, tmp_path / "oxford-iiit-pet")
    assert "--download" in str(exc.value)


def test_pets_full_size_checks_reject_a_partial_copy(tmp_path, monkeypatch):
    monkeypatch.delenv(replicas.PARTIAL_ENV, raising=False)
    replicas.make_pets(tmp_path)
    with pytest.raises(DatasetCorruptError) as exc:
        create_dataset("pets", data_root=str(tmp_path))
    msg = replicas.assert_one_line(exc)
    assert "37" in msg and replicas.PARTIAL_ENV in msg


@pytest.mark.parametrize(
    "damage, expect",
    [
        (lambda b: (b / "images" / "Bengal_12.jpg").unlink(), "Bengal_12.jpg"),
        (lambda b: (b / "annotations" / "test.txt").unlink(), "test.txt"),
        (lambda b: (b / "annotations" / "trainval.txt").write_text("Abyssinian_1 one 1 1\n"), "line 1"),
        (lambda b: (b / "annotations" / "trainval.txt").write_text("Abyssinian_1 0 1 1\n"), "1-based"),
    ],
    ids=["listed-image-missing", "no-test-annotations", "bad-line", "zero-class"],
)
def test_pets_corrupt(tmp_path, monkeypatch, damage, expect):
    replicas.allow_partial(monkeypatch)
    base = replicas.make_pets(tmp_path)
    damage(base)
    with pytest.raises(DatasetCorruptError) as exc:
        create_dataset("pets", data_root=str(tmp_path))
    assert expect in replicas.assert_one_line(exc)
