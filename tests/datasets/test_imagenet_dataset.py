"""`imagenet` on a fabricated ILSVRC folder replica (train/<wnid>/, val/<wnid>/)."""
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replicas  # noqa: E402

from sparsebench.datasets import DatasetCorruptError, DatasetNotFoundError, create_dataset  # noqa: E402


def test_imagenet_replica_loads(tmp_path, monkeypatch):
    replicas.allow_partial(monkeypatch)
    replicas.make_imagenet(tmp_path, n_train=3, n_val=2)
    splits = create_dataset("imagenet", data_root=str(tmp_path), img_size=32, val_fraction=0.34)
    replicas.check_splits(splits, num_classes=3, n_train_total=9, n_test=6, img_size=32, val_fraction=0.34)
    assert "image-net.org" in splits.info.source
    # class indices follow the sorted wnid folders, identical in train and val
    wnids = sorted(replicas.IMAGENET_WNIDS)
    for path, label in splits.test.base.samples:
        assert Path(path).parent.name == wnids[label]


@pytest.mark.parametrize("download", [False, True])
def test_imagenet_missing_explains_manual_download(tmp_path, download):
    with pytest.raises(DatasetNotFoundError) as exc:
        create_dataset("imagenet", data_root=str(tmp_path), download=download)
    replicas.assert_not_found(exc, tmp_path / "imagenet")
    msg = str(exc.value)
    assert "image-net.org" in msg and "cannot be downloaded" in msg and "valprep" in msg


def test_imagenet_full_size_checks_reject_a_partial_copy(tmp_path, monkeypatch):
    monkeypatch.delenv(replicas.PARTIAL_ENV, raising=False)
    replicas.make_imagenet(tmp_path)
    with pytest.raises(DatasetCorruptError) as exc:
        create_dataset("imagenet", data_root=str(tmp_path))
    msg = replicas.assert_one_line(exc)
    assert "1000" in msg and replicas.PARTIAL_ENV in msg


def _flatten_val(base):
    for folder in list((base / "val").iterdir()):
        for f in folder.iterdir():
            f.rename(base / "val" / f.name)
        folder.rmdir()


@pytest.mark.parametrize(
    "damage, expect",
    [
        (_flatten_val, "valprep"),
        (lambda b: shutil.rmtree(b / "val" / "n01484850"), "class count mismatch"),
        (lambda b: shutil.rmtree(b / "val"), "missing val"),
        (lambda b: [f.unlink() for f in (b / "train" / "n01443537").iterdir()], "n01443537"),
    ],
    ids=["flat-val", "val-class-missing", "no-val", "empty-class-folder"],
)
def test_imagenet_corrupt(tmp_path, monkeypatch, damage, expect):
    replicas.allow_partial(monkeypatch)
    base = replicas.make_imagenet(tmp_path)
    damage(base)
    with pytest.raises(DatasetCorruptError) as exc:
        create_dataset("imagenet", data_root=str(tmp_path))
    assert expect in replicas.assert_one_line(exc)
