"""A full, read-only or forbidden disk while writing checkpoints, records and reports: one line
naming the path and the operation, exit 1, no temp file left, and a rerun after the fix resumes.

The file systems are real: a 300 KB tmpfs (mounting needs root; else these tests skip or fall
back to a folder without write permission, which stops writes only for a non-root user)."""
import contextlib
import errno
import os
import subprocess

import pytest

from sparsebench import platform
from sparsebench.cli import main


@contextlib.contextmanager
def tmpfs(where, size="300k"):
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip() or 'not root'})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _remount(where, options):
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


def _leftovers(root):
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_a_refused_write_is_one_error_naming_path_and_operation_and_leaves_no_temp_file(tmp_path):
    with tmpfs(tmp_path / "fs") as fs:
        with pytest.raises(platform.StorageError) as full:
            platform.atomic_write_bytes(fs / "records" / "r.json", b"x" * 400_000)
        assert full.value.errno == errno.ENOSPC and "\n" not in str(full.value)
        assert str(full.value).startswith(f"cannot write record {fs / 'records' / 'r.json'}: ")
        assert "[ENOSPC]" in str(full.value)
        assert not (fs / "records" / "r.json").exists() and _leftovers(fs) == []
        platform.atomic_write_bytes(fs / "checkpoints" / "c.pt", b"old")
        _remount(fs, "ro")
        with pytest.raises(platform.StorageError, match=r"cannot write checkpoint .*c\.pt: Read-only file system \[EROFS\]"):
            platform.atomic_write_bytes(fs / "checkpoints" / "c.pt", b"new")
        assert (fs / "checkpoints" / "c.pt").read_bytes() == b"old"              # the old file stands, whole
        with pytest.raises(platform.StorageError, match=r"cannot take dense checkpoint lock .*EROFS"):
            with platform.file_lock(fs / "checkpoints" / "d.lock", what="dense checkpoint"):
                pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a folder without write permission")
def test_a_folder_without_write_permission_is_one_error(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(platform.StorageError, match=r"cannot write report .*\[EACCES\]"):
            platform.atomic_write_bytes(folder / "leaderboard.md", b"x")
    finally:
        folder.chmod(0o755)


RUN = ["run", "--method", "magnitude-global", "--model", "resnet20_tiny", "--dataset", "digits",
       "--target", "sparsity=0.5", "--img-size", "16", "--no-latency", "--quiet", "--checkpoint-every", "5",
       "--recipe", "pretrain_epochs=0.3", "--recipe", "finetune_epochs=0.2", "--recipe", "search_epochs=0.2"]


@pytest.mark.slow
def test_a_run_into_a_full_disk_stops_with_one_line_and_resumes_once_there_is_room(tmp_path, capsys):
    with tmpfs(tmp_path / "fs") as fs:
        out = fs / "out"
        assert main(RUN + ["--out", str(out)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sparsebench: error: cannot write checkpoint ") \
            and str(out) in err[0] and err[0].endswith("No space left on device [ENOSPC]"), err
        assert not list(out.glob("records/*.json")) and _leftovers(fs) == []
        assert not list(out.glob("checkpoints/dense-*.pt"))                 # no cache file a later run would trust
        _remount(fs, "size=20m")                                             # space freed
        assert main(RUN + ["--out", str(out)]) == 0
        assert len(list(out.glob("records/*.json"))) == 1 and _leftovers(fs) == []
        capsys.readouterr()
        _remount(fs, "ro")                                                   # reports on a read-only disk
        assert main(["report", str(out), "--out", str(out / "site")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Read-only file system [EROFS]" in err[0] and str(out) in err[0], err
