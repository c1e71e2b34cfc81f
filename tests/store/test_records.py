import json

import pytest

from sparsebench.store.records import RecordStore, atomic_write_text


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    import os

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "r.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_store_round_trip_and_exists(tmp_path):
    store = RecordStore(tmp_path)
    record = {"run_id": "x__y", "value": 1.5}
    assert not store.exists("x__y")
    store.write(record)
    assert store.exists("x__y") and store.read("x__y") == record
    assert store.load_all() == [record]
    assert json.loads((tmp_path / "records" / "x__y.json").read_text()) == record


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    import os

    old = os.umask(umask)
    try:
        path = RecordStore(tmp_path).write({"run_id": "r"})
        atomic_write_text(tmp_path / "leaderboard.md", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode
    assert (tmp_path / "leaderboard.md").stat().st_mode & 0o777 == mode
