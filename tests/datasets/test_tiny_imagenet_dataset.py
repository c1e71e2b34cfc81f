"""`tiny-imagenet` on a fabricated replica of tiny-imagenet-200/."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replicas  # noqa: E402

from sparsebench.datasets import DatasetCorruptError, DatasetNotFoundError, create_dataset  # noqa: E402
from sparsebench.datasets import tiny_imagenet  # noqa: E402


def test_tiny_imagenet_replica_loads_at_native_64(tmp_path, monkeypatch):
    replicas.allow_partial(monkeypatch)
    replicas.make_tiny_imagenet(tmp_path, n_train=4, n_val=2)
    splits = create_dataset("tiny-imagenet", data_root=str(tmp_path), val_fraction=0.25, split_seed=1)
    replicas.check_splits(splits, num_classes=3, n_train_total=12, n_test=6, img_size=64, val_fraction=0.25)
    assert "cs231n" in splits.info.source


def test_tiny_imagenet_labels_follow_sorted_wnids_and_val_annotations(tmp_path, monkeypatch):
    replicas.allow_partial(monkeypatch)
    base = replicas.make_tiny_imagenet(tmp_path, n_train=4, n_val=2)
    splits = create_dataset("tiny-imagenet", data_root=str(tmp_path), img_size=32, val_fraction=0.25)
    classes = sorted(replicas.TINY_WNIDS)
    train_view = splits.train.dataset                       # the official train split, in order
    for path, label in train_view.base.samples:
        assert Path(path).parent.parent.name == classes[label]
    annotations = dict(
        line.split("\t")[:2] for line in (base / "val" / "val_annotations.txt").read_text().splitlines()
    )
    for path, label in splits.test.base.samples:
        assert annotations[Path(path).name] == classes[label]
    # the first training image is a grayscale JPEG: it comes out as 3 channels
    x, _ = train_view[0]
    assert tuple(x.shape) == (3, 32, 32)


def test_tiny_imagenet_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as exc:
        create_dataset("tiny-imagenet", data_root=str(tmp_path))
    replicas.assert_not_found(exc, tmp_path / "tiny-imagenet-200")
    assert "--download" in str(exc.value)


def test_tiny_imagenet_full_size_checks_reject_a_partial_copy(tmp_path, monkeypatch):
    monkeypatch.delenv(replicas.PARTIAL_ENV, raising=False)
    replicas.make_tiny_imagenet(tmp_path)
    with pytest.raises(DatasetCorruptError) as exc:
        create_dataset("tiny-imagenet", data_root=str(tmp_path))
    msg = replicas.assert_one_line(exc)
    assert "200" in msg and replicas.PARTIAL_ENV in msg


@pytest.mark.parametrize(
    "damage, expect",
    [
        (lambda b: (b / "val" / "images" / "val_1.JPEG").unlink(), "val_1.JPEG"),
        (lambda b: (b / "wnids.txt").unlink(), "wnids.txt"),
        (lambda b: (b / "val" / "val_annotations.txt").unlink(), "val_annotations.txt"),
        (lambda b: (b / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n"), "n99999999"),
        (lambda b: (b / "val" / "val_annotations.txt").write_text("garbage\n"), "line 1"),
        (lambda b: (b / "wnids.txt").write_text("n02124075\nn01443537\nn01629819\nn04067472\n"), "n04067472"),
        (lambda b: (b / "train" / "n09999999").mkdir(), "n09999999"),
    ],
    ids=["listed-val-image-missing", "no-wnids", "no-val-annotations", "unknown-wnid", "bad-line",
         "class-without-train-folder", "extra-train-folder"],
)
def test_tiny_imagenet_corrupt(tmp_path, monkeypatch, damage, expect):
    replicas.allow_partial(monkeypatch)
    base = replicas.make_tiny_imagenet(tmp_path, n_train=2, n_val=1, size=16)
    damage(base)
    with pytest.raises(DatasetCorruptError) as exc:
        create_dataset("tiny-imagenet", data_root=str(tmp_path))
    assert expect in replicas.assert_one_line(exc)


def test_tiny_imagenet_download_uses_official_url(tmp_path, monkeypatch):
    replicas.allow_partial(monkeypatch)
    calls = []

    def fake_download(url, download_root, *args, **kwargs):
        calls.append((url, kwargs.get("md5")))
        replicas.make_tiny_imagenet(Path(download_root))

    monkeypatch.setattr(tiny_imagenet, "download_and_extract_archive", fake_download)
    splits = create_dataset("tiny-imagenet", data_root=str(tmp_path), download=True, val_fraction=0.25)
    assert calls == [("http://cs231n.stanford.edu/tiny-imagenet-200.zip", tiny_imagenet.MD5)]
    assert splits.info.num_classes == 3
