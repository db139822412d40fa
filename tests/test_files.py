"""leader_edge.files: atomic writes leave the old output on failure; the lock excludes another process."""

import subprocess
import sys
import time

import pytest

from leader_edge.errors import DataError
from leader_edge.files import atomic_directory, atomic_file, atomic_write_text, file_lock, sha256


def test_atomic_file_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_text(path, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(path) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".json"
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_atomic_directory_refuses_a_foreign_directory_and_cleans_up_on_failure(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match="is not a bundle directory"):
        with atomic_directory(foreign, marker="manifest.json", what="bundle"):
            pass
    out = tmp_path / "b"
    with atomic_directory(out, marker="manifest.json", what="bundle") as tmp:
        (tmp / "manifest.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_directory(out, marker="manifest.json", what="bundle") as tmp:
            (tmp / "manifest.json").write_text("half")
            raise RuntimeError("boom")
    assert (out / "manifest.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["b", "mine"]


def test_sha256_of_a_file():
    assert sha256(__file__) == __import__("hashlib").sha256(open(__file__, "rb").read()).hexdigest()


def test_file_lock_waits_for_another_process(tmp_path):
    lock = tmp_path / "cache.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from leader_edge.files import file_lock\n"
        f"with file_lock({str(lock)!r}):\n    print('held', flush=True); time.sleep(1.0)\n")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    with file_lock(lock):
        waited = time.monotonic() - t0
    holder.wait(timeout=30)
    assert waited > 0.5  # the holder sleeps 1 s inside the lock
