"""The platform layer: local answers by default, the process group's under torch.distributed,
and every file the store, the dense cache and the trainer write is written by the primary only."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp

from sparsebench import platform
from sparsebench.platform import Platform
from tests.conftest import make_record


def test_local_platform_is_the_one_primary_process(tmp_path):
    p = platform.current()
    assert (p.rank, p.world_size, p.is_primary, p.distributed) == (0, 1, True, False)
    assert p.device("cpu") == torch.device("cpu") and p.broadcast({"a": 1}) == {"a": 1}
    p.barrier()
    assert p.write_text(tmp_path / "a" / "x.txt", "hi") and (tmp_path / "a" / "x.txt").read_text() == "hi"


def test_only_the_primary_writes_records_and_checkpoints(tmp_path, monkeypatch):
    from sparsebench.store import RecordStore
    from sparsebench.training.resume import RunCheckpoints

    other = Platform(rank=1, world_size=2)
    assert not other.is_primary and not other.write_bytes(tmp_path / "y", b"x") and not (tmp_path / "y").exists()
    monkeypatch.setattr("sparsebench.store.records.current_platform", lambda: other)
    monkeypatch.setattr("sparsebench.training.resume.current_platform", lambda: other)
    path = RecordStore(tmp_path).write(make_record(run_id="r"))
    assert not path.exists()
    ckpts = RunCheckpoints(tmp_path / "partial" / "h")
    ckpts.save(0, {"a": torch.zeros(1)})
    assert not ckpts.path(0).exists()
    (tmp_path / "partial" / "h").mkdir(parents=True)
    ckpts.clear()                                # a non-primary rank leaves the primary's files alone
    assert (tmp_path / "partial" / "h").exists()


def test_a_run_lock_is_not_taken_twice(tmp_path):
    from sparsebench.store import RecordStore

    store = RecordStore(tmp_path)
    with store.lock("r") as mine:
        assert mine
        with platform.file_lock(store.records_dir / ".locks" / "r.lock", blocking=False) as again:
            assert not again                      # flock is per open file: a second open is another holder
    with store.lock("r") as mine:
        assert mine


def _rank(rank, world, init, out):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        from sparsebench.store import RecordStore

        p = platform.current()
        assert (p.rank, p.world_size, p.is_primary, p.distributed) == (rank, world, rank == 0, True)
        assert p.broadcast(f"from {rank}") == "from 0"
        RecordStore(out).write(make_record(run_id=f"written-by-{rank}"))
        p.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_under_gloo_rank_0_is_primary_and_writes_alone(tmp_path):
    os.environ.setdefault("PYTHONPATH", os.getcwd())
    tmp_mp.spawn(_rank, args=(2, tmp_path / "init", tmp_path / "out"), nprocs=2, join=True)
    assert sorted(p.name for p in (tmp_path / "out" / "records").glob("*.json")) == ["written-by-0.json"]
