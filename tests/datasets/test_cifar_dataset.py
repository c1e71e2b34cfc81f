"""`cifar10` / `cifar100` on fabricated replicas of the python pickle batches."""
import pickle
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replicas  # noqa: E402

from sparsebench.datasets import DatasetCorruptError, DatasetNotFoundError, create_dataset  # noqa: E402


def test_cifar10_replica_loads(tmp_path, monkeypatch):
    replicas.allow_partial(monkeypatch)
    replicas.make_cifar10(tmp_path, per_batch=8, n_test=6)
    splits = create_dataset("cifar10", data_root=str(tmp_path), val_fraction=0.25, split_seed=3)
    replicas.check_splits(splits, num_classes=10, n_train_total=40, n_test=6, img_size=32, val_fraction=0.25)
    assert splits.info.mean == (0.4914, 0.4822, 0.4465)
    assert splits.info.std == (0.2470, 0.2435, 0.2616)
    assert "cs.toronto.edu" in splits.info.source
    assert splits.split["split_seed"] == 3
    # validation uses eval transforms: deterministic
    assert torch.equal(splits.val[0][0], splits.val[0][0])


def test_cifar10_labels_and_pixels_come_from_the_batches(tmp_path, monkeypatch):
    replicas.allow_partial(monkeypatch)
    base = replicas.make_cifar10(tmp_path, per_batch=8, n_test=6)
    with open(base / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")          # the CIFAR page's way: bytes keys
    splits = create_dataset("cifar10", data_root=str(tmp_path), val_fraction=0.25)
    x, y = splits.test[2]
    assert y == batch[b"labels"][2]
    raw = torch.tensor(batch[b"data"][2], dtype=torch.uint8).view(3, 32, 32)
    assert torch.equal(x, raw)                # the pixels as stored; the loader normalises them


def test_cifar100_replica_loads_with_img_size_override(tmp_path, monkeypatch):
    replicas.allow_partial(monkeypatch)
    replicas.make_cifar100(tmp_path, num_classes=4, n_train=12, n_test=8)
    splits = create_dataset("cifar100", data_root=str(tmp_path), img_size=24, val_fraction=0.34)
    replicas.check_splits(splits, num_classes=4, n_train_total=12, n_test=8, img_size=24, val_fraction=0.34)
    assert splits.info.mean == (0.5071, 0.4865, 0.4409)


def test_cifar_missing_names_directory_and_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError) as exc:
        create_dataset("cifar10", data_root=str(tmp_path))
    replicas.assert_not_found(exc, tmp_path / "cifar-10-batches-py")
    assert "--download" in str(exc.value) and "cifar10" in str(exc.value)
    with pytest.raises(DatasetNotFoundError) as exc:
        create_dataset("cifar100", data_root=str(tmp_path))
    replicas.assert_not_found(exc, tmp_path / "cifar-100-python")


def test_cifar_full_size_checks_reject_a_partial_copy(tmp_path, monkeypatch):
    monkeypatch.delenv(replicas.PARTIAL_ENV, raising=False)
    replicas.make_cifar10(tmp_path)
    with pytest.raises(DatasetCorruptError) as exc:
        create_dataset("cifar10", data_root=str(tmp_path))
    msg = replicas.assert_one_line(exc)
    assert "MD5" in msg and replicas.PARTIAL_ENV in msg


def test_cifar_missing_batch_is_corrupt(tmp_path, monkeypatch):
    replicas.allow_partial(monkeypatch)
    base = replicas.make_cifar10(tmp_path)
    (base / "data_batch_4").unlink()
    with pytest.raises(DatasetCorruptError) as exc:
        create_dataset("cifar10", data_root=str(tmp_path))
    assert "data_batch_4" in replicas.assert_one_line(exc)


def test_cifar_unreadable_pickle_is_corrupt(tmp_path, monkeypatch):
    replicas.allow_partial(monkeypatch)
    base = replicas.make_cifar100(tmp_path)
    data = (base / "train").read_bytes()
    (base / "train").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetCorruptError) as exc:
        create_dataset("cifar100", data_root=str(tmp_path))
    assert "cifar100" in replicas.assert_one_line(exc)


def test_cifar_label_out_of_range_is_corrupt(tmp_path, monkeypatch):
    replicas.allow_partial(monkeypatch)
    base = replicas.make_cifar100(tmp_path, num_classes=4)
    replicas.write_py2_pickle(
        {"fine_label_names": ["a", "b"], "coarse_label_names": ["c"]}, base / "meta"   # 2 names, labels up to 3
    )
    with pytest.raises(DatasetCorruptError, match="labels outside"):
        create_dataset("cifar100", data_root=str(tmp_path))


def test_cifar_download_passes_through_to_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    replicas.allow_partial(monkeypatch)
    calls = []

    def fake_download(url, download_root, *args, **kwargs):
        calls.append(url)
        replicas.make_cifar10(Path(download_root), per_batch=8)

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fake_download)
    splits = create_dataset("cifar10", data_root=str(tmp_path), download=True, val_fraction=0.25)
    assert calls == [tv_cifar.CIFAR10.url]
    assert splits.split["n_train"] + splits.split["n_val"] == 40
    # already there: no second download
    create_dataset("cifar10", data_root=str(tmp_path), download=True, val_fraction=0.25)
    assert len(calls) == 1


def test_cifar_failed_download_is_not_found(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    with pytest.raises(DatasetNotFoundError) as exc:
        create_dataset("cifar100", data_root=str(tmp_path), download=True)
    msg = replicas.assert_one_line(exc)
    assert "download" in msg and "network unreachable" in msg and str(tmp_path) in msg
