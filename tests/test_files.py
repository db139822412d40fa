"""leader_edge.files: atomic writes leave the old output on failure (and on SIGTERM/SIGINT under the CLI),
take the umask's mode, clean what a killed run left; the lock excludes another process."""

import fcntl
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from leader_edge.errors import DataError
from leader_edge.files import (atomic_directory, atomic_file, atomic_write_text, file_lock, output_mode, sha256, temp_directory,
                               temp_path, temp_tag)


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


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_outputs_take_the_mode_the_umask_gives_and_replaced_ones_keep_theirs(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "metrics.json", "{}")  # mkstemp made every output 0600 whatever the umask
        with atomic_directory(tmp_path / "bundle", marker="manifest.json", what="bundle") as tmp:
            (tmp / "manifest.json").write_text("{}")  # mkdtemp: 0700
            os.close(os.open(tmp / "model.safetensors", os.O_CREAT | os.O_WRONLY, 0o600))  # as safetensors' save_file
            (tmp / "sub").mkdir(mode=0o700)
        assert output_mode(tmp_path / "new.csv") == file_mode
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "bundle").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "bundle" / "model.safetensors").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "bundle" / "sub").stat().st_mode) == dir_mode
    (tmp_path / "metrics.json").chmod(0o640)
    (tmp_path / "bundle").chmod(0o750)
    atomic_write_text(tmp_path / "metrics.json", "{}")
    with atomic_directory(tmp_path / "bundle", marker="manifest.json", what="bundle") as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "bundle").stat().st_mode) == 0o750


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # gone; reused within this test only by a rare wrap-around of the pid counter


def test_stale_temps_of_a_killed_run_removed_live_and_foreign_ones_left(tmp_path):
    out = tmp_path / "bundle"
    host = temp_tag().split(".", 1)[1].rsplit(".", 2)[0]
    dead = _dead_pid()
    stale_dir = tmp_path / f".bundle.leader-edge.{host}.{dead}.0a1b2c3d.tmp"  # a SIGKILLed atomic_directory
    stale_dir.mkdir()
    (stale_dir / "model.onnx").write_bytes(b"x" * 100)
    stale_work = tmp_path / f".bundle.export.leader-edge.{host}.{dead}.0a1b2c3d.tmp"  # a SIGKILLed export's work dir
    stale_work.mkdir()
    live = temp_path(out)  # this process's: alive
    live.mkdir()
    other_host = tmp_path / f".bundle.leader-edge.elsewhere.{dead}.0a1b2c3d.tmp"  # its pid means nothing here
    other_host.mkdir()
    held = tmp_path / f".bundle.leader-edge.{host}.{_dead_pid()}.0b1b2c3d.tmp"  # pid gone, yet locked by a writer
    held.mkdir()
    fd = os.open(held, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    other_output = tmp_path / f".bundles.leader-edge.{host}.{dead}.0a1b2c3d.tmp"  # another output's
    other_output.mkdir()
    try:
        with atomic_directory(out, marker="manifest.json", what="bundle") as tmp:
            (tmp / "manifest.json").write_text("{}")
    finally:
        os.close(fd)
    assert not stale_dir.exists() and stale_work.exists()  # the export's work dir is export's to clean
    assert live.exists() and other_host.exists() and held.exists() and other_output.exists()
    with temp_directory(tmp_path / "bundle.export") as work:
        assert work.name.startswith(".bundle.export.leader-edge.") and stat.S_IMODE(work.stat().st_mode) == 0o700
        assert not stale_work.exists()
    assert not work.exists()
    stale_file = tmp_path / f".out.json.leader-edge.{host}.{dead}.0a1b2c3d.tmp.json"  # a SIGKILLed atomic_file
    stale_file.write_text("half")
    atomic_write_text(tmp_path / "out.json", "{}")
    assert not stale_file.exists()


_KILLED_WRITER = """
import sys, time, types
import click
from leader_edge import cli
from leader_edge.files import atomic_directory, atomic_file

@click.command()
def slowwrite():
    with atomic_file(sys.argv[1] + "/report.md") as tmp, atomic_directory(sys.argv[1] + "/bundle", marker="m", what="x") as d:
        tmp.write_text("half")
        (d / "m").write_text("half")
        print("writing", flush=True)
        time.sleep(60)

sys.modules["leader_edge.cli.slowwrite"] = types.SimpleNamespace(slowwrite=slowwrite)
cli.COMMANDS["slowwrite"] = "a command that writes slowly"
cli.main(["slowwrite"])
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_signal_mid_write_removes_every_temp_and_exits_128_plus_signal(tmp_path, signum):
    """Any command (here a test one added to the group) killed while its atomic writers are open."""
    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER)
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    assert len(list(out.iterdir())) == 2  # both temporaries exist
    p.send_signal(signum)
    stderr = p.stderr.read()
    assert p.wait(timeout=30) == 128 + signum, stderr
    assert f"slowwrite: stopped by {signal.Signals(signum).name}" in stderr and "Traceback" not in stderr
    assert list(out.iterdir()) == []
