"""`flowers102` on a fabricated replica of flowers-102/ (torchvision Flowers102 layout)."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replicas  # noqa: E402

from sparsebench.datasets import DatasetCorruptError, DatasetNotFoundError, create_dataset  # noqa: E402


def test_flowers102_replica_loads_train_plus_val_as_train(tmp_path, monkeypatch):
    replicas.allow_partial(monkeypatch)
    replicas.make_flowers102(tmp_path, num_classes=3, n_train=2, n_val=2, n_test=2)
    splits = create_dataset("flowers102", data_root=str(tmp_path), img_size=32, val_fraction=0.25)
    # official train (6) + official val (6) are our train; our val is carved from those 12
    replicas.check_splits(splits, num_classes=3, n_train_total=12, n_test=6, img_size=32, val_fraction=0.25)
    assert "Nilsback" in splits.info.source


def test_flowers102_labels_come_from_imagelabels(tmp_path, monkeypatch):
    from scipy.io import loadmat

    replicas.allow_partial(monkeypatch)
    base = replicas.make_flowers102(tmp_path)
    splits = create_dataset("flowers102", data_root=str(tmp_path), img_size=16, val_fraction=0.25)
    labels = loadmat(str(base / "imagelabels.mat"), squeeze_me=True)["labels"]
    tstid = np.atleast_1d(loadmat(str(base / "setid.mat"), squeeze_me=True)["tstid"])
    assert [splits.test[i][1] for i in range(len(splits.test))] == [int(labels[i - 1]) - 1 for i in tstid]


def test_flowers102_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as exc:
        create_dataset("flowers102", data_root=str(tmp_path))
    replicas.assert_not_found(exc, tmp_path / "flowers-102")
    assert "--download" in str(exc.value)


def test_flowers102_full_size_checks_reject_a_partial_copy(tmp_path, monkeypatch):
    monkeypatch.delenv(replicas.PARTIAL_ENV, raising=False)
    replicas.make_flowers102(tmp_path)
    with pytest.raises(DatasetCorruptError) as exc:
        create_dataset("flowers102", data_root=str(tmp_path))
    assert "MD5" in replicas.assert_one_line(exc)


def _labels_out_of_range(base):
    from scipy.io import savemat

    savemat(str(base / "imagelabels.mat"), {"labels": np.zeros((1, 18), dtype=np.uint8)})


@pytest.mark.parametrize(
    "damage, expect",
    [
        (lambda b: (b / "jpg" / "image_00005.jpg").unlink(), "image_00005.jpg"),
        (lambda b: (b / "setid.mat").write_bytes(b"not a mat file"), "setid.mat"),
        (lambda b: (b / "imagelabels.mat").unlink(), "imagelabels.mat"),
        (_labels_out_of_range, "1-based"),
    ],
    ids=["listed-image-missing", "unparseable-setid", "no-imagelabels", "bad-labels"],
)
def test_flowers102_corrupt(tmp_path, monkeypatch, damage, expect):
    replicas.allow_partial(monkeypatch)
    base = replicas.make_flowers102(tmp_path)
    damage(base)
    with pytest.raises(DatasetCorruptError) as exc:
        create_dataset("flowers102", data_root=str(tmp_path))
    assert expect in replicas.assert_one_line(exc)
