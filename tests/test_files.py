"""leader_edge.files: atomic writes leave the old output on failure (and on SIGTERM/SIGINT under the CLI),
take the umask's mode, clean what a killed run left; the lock excludes another process."""

import errno
import fcntl
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from leader_edge.errors import DataError
from leader_edge.files import (atomic_directory, atomic_file, atomic_write_text, file_lock, held_temp, output_mode,
                               remove_stale_temps, sha256, temp_directory, temp_path, temp_tag)
from leader_edge.signals import Interrupted, signals_raise


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


def test_held_temp_is_private_held_removed_on_failure_and_closed_once(tmp_path):
    out = tmp_path / "recs.csv"
    with pytest.raises(KeyboardInterrupt):
        with held_temp(out) as held:
            assert held.path.parent == tmp_path and held.path.name.startswith(".recs.csv.leader-edge.")
            assert stat.S_IMODE(os.stat(held.path).st_mode) == 0o600
            with pytest.raises(BlockingIOError):  # held: another descriptor cannot lock it
                other = os.open(held.path, os.O_WRONLY)
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                finally:
                    os.close(other)
            fd = held.fd
            os.write(fd, b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError):
        os.fstat(fd)  # closed on the way out
    with held_temp(out) as held:
        os.write(held.fd, b"whole")
        held.close()
        held.close()  # a second close does nothing (the block's end closes it a third time)
        os.replace(held.path, out)
    assert out.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [out]


def test_held_temp_close_error_does_not_hide_the_error_that_ended_the_block(tmp_path, monkeypatch):
    """On NFS a failed write-back shows at close(): after a bad input row, that EIO must not replace
    the row's DataError; the temp file is removed all the same."""
    import leader_edge.files as files

    real_close = os.close

    def close(fd):
        real_close(fd)
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(DataError, match="bad row"):
        with held_temp(tmp_path / "recs.csv") as held:
            os.write(held.fd, b"part")
            monkeypatch.setattr(files.os, "close", close)
            raise DataError(tmp_path / "in.csv", "bad row")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


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


def test_atomic_directory_with_owns_refuses_a_folder_holding_other_files(tmp_path):
    """A folder of someone else's files beside a file named like the marker (or extra files in our
    own output) was replaced whole: the files were lost without a word."""
    out = tmp_path / "out"
    (out / "imagesTr").mkdir(parents=True)
    (out / "dataset.json").write_text('{"name": "Task01"}')
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"holds imagesTr, notes.txt, which a dataset directory does not"):
        with atomic_directory(out, marker="dataset.json", what="dataset", owns=("dataset.json", "visits.csv")):
            raise AssertionError("refused before the block runs")
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "imagesTr", "notes.txt"]
    (out / "imagesTr").rmdir()
    (out / "notes.txt").unlink()
    with pytest.raises(DataError, match="is not a dataset directory"):  # the marker's content is not ours
        with atomic_directory(out, marker="dataset.json", what="dataset", owns=("dataset.json",),
                              is_ours=lambda p: "format_version" in p.read_text()):
            pass
    (out / "dataset.json").write_text('{"format_version": 1}')
    with atomic_directory(out, marker="dataset.json", what="dataset", owns=("dataset.json",),
                          is_ours=lambda p: "format_version" in p.read_text()) as tmp:
        (tmp / "dataset.json").write_text('{"format_version": 2}')
    assert (out / "dataset.json").read_text() == '{"format_version": 2}'


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


def _host() -> str:
    return temp_tag().split(".", 1)[1].rsplit(".", 2)[0]


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _write_dir(out, text):
    with atomic_directory(out, marker="m", what="checkpoint") as tmp:
        (tmp / "m").write_text(text)


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
    fd = os.open(f"{held}.lock", os.O_RDWR | os.O_CREAT, 0o600)  # a temp directory is held through its sidecar
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
    assert len(list(out.iterdir())) == 3  # both temporaries exist, and the temp directory's sidecar lock
    p.send_signal(signum)
    stderr = p.stderr.read()
    assert p.wait(timeout=30) == 128 + signum, stderr
    assert f"slowwrite: stopped by {signal.Signals(signum).name}" in stderr and "Traceback" not in stderr
    assert list(out.iterdir()) == []


def test_atomic_directory_keeps_the_old_output_when_the_swap_fails(tmp_path, monkeypatch):
    """The old swap removed the old directory first: an Interrupted at the rename lost both copies."""
    out = tmp_path / "ckpt"
    _write_dir(out, "old")
    real = os.replace

    def replace(src, dst):
        if Path(dst) == out:  # renaming the new copy in
            raise Interrupted(signal.SIGTERM)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Interrupted):
        _write_dir(out, "new")
    assert (out / "m").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_atomic_directory_holds_a_signal_back_until_the_swap_is_done(tmp_path, monkeypatch):
    """A SIGTERM between the two renames (under the CLI's signals_raise) raises only after both."""
    out = tmp_path / "ckpt"
    _write_dir(out, "old")
    real = os.replace

    def replace(src, dst):
        if Path(dst) == out:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Interrupted):
        with signals_raise():
            _write_dir(out, "new")
    assert (out / "m").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert not [t for t in threading.enumerate() if t.name.startswith("leader-edge-signal-watchdog")]


def test_stale_aside_copy_of_a_run_killed_mid_swap_is_restored(tmp_path):
    out, host, dead = tmp_path / "ckpt", _host(), _dead_pid()
    aside = tmp_path / f".ckpt.leader-edge.{host}.{dead}.0a1b2c3d.tmp.old"  # SIGKILLed between the two renames
    aside.mkdir()
    (aside / "m").write_text("old")
    new = tmp_path / f".ckpt.leader-edge.{host}.{dead}.0b1b2c3d.tmp"
    new.mkdir()
    assert remove_stale_temps(out) == [new]
    assert (out / "m").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    aside.mkdir()  # with the output in place, an aside copy is only removed
    assert remove_stale_temps(out) == [aside] and (out / "m").read_text() == "old"


def test_stale_temps_are_locked_through_a_writable_descriptor_as_nfs_needs(tmp_path, monkeypatch):
    """NFS emulates flock with a POSIX lock: LOCK_EX on a read-only descriptor fails with EBADF."""
    real = fcntl.flock

    def nfs_flock(fd, operation):
        if operation & fcntl.LOCK_EX and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", nfs_flock)
    host, dead = _host(), _dead_pid()
    stale_file = tmp_path / f".out.json.leader-edge.{host}.{dead}.0a1b2c3d.tmp.json"
    stale_file.write_text("half")
    stale_dir = tmp_path / f".out.leader-edge.{host}.{dead}.0a1b2c3d.tmp"
    stale_dir.mkdir()
    (stale_dir / "model.onnx").write_bytes(b"x")
    held = tmp_path / f".out.leader-edge.{host}.{_dead_pid()}.0b1b2c3d.tmp"  # pid gone, a forked worker holds it
    held.mkdir()
    fd = os.open(f"{held}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert remove_stale_temps(tmp_path / "out.json") == [stale_file]
        assert remove_stale_temps(tmp_path / "out") == [stale_dir]
        with temp_directory(tmp_path / "out") as work:  # this process's own temp directory is held too
            probe = os.open(f"{work}.lock", os.O_RDWR)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(probe)
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == [held.name, held.name + ".lock"]


def test_atomic_directory_modes_skip_symlinks_and_keep_executable_bits(tmp_path):
    outside, secret = tmp_path / "outside", tmp_path / "secret"
    outside.mkdir()
    outside.chmod(0o700)
    secret.write_text("s")
    secret.chmod(0o600)
    out = tmp_path / "bundle"
    old = os.umask(0o022)
    try:
        with atomic_directory(out, marker="m", what="bundle") as tmp:
            (tmp / "m").write_text("{}")
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "run.sh").chmod(0o700)
            (tmp / "link").symlink_to(outside, target_is_directory=True)  # os.walk lists it among the dirs
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "secret").symlink_to(secret)
    finally:
        os.umask(old)
    assert _mode(outside) == 0o700 and _mode(secret) == 0o600
    assert _mode(out / "run.sh") == 0o755 and _mode(out / "m") == 0o644 and _mode(out / "sub") == 0o755


_BLOCKED = """
import ctypes, os, signal, sys, threading, time
from leader_edge.signals import Interrupted, signals_raise

def ready(main):  # once the main thread waits on a futex (x86-64: syscall 202, arm64: 98), or after 5 s
    for _ in range(500):
        try:
            if open(f"/proc/self/task/{main}/syscall").read().split()[0] in ("202", "98"):
                break
        except OSError:
            pass
        time.sleep(0.01)
    print("blocked", flush=True)

try:
    with signals_raise():
        if sys.argv[1] == "in-c":  # as a collective whose peer is gone: a wait in C that a signal does not end
            threading.Thread(target=ready, args=(threading.get_native_id(),), daemon=True).start()
            libc, mutex = ctypes.CDLL(None), ctypes.create_string_buffer(64)  # zeros: a default glibc mutex
            libc.pthread_mutex_lock(mutex)
            libc.pthread_mutex_lock(mutex)  # relocked by its owner: blocks for good, no bytecode runs
        elif sys.argv[1] == "in-python":
            print("blocked", flush=True)
            time.sleep(60)
        else:  # a forked child (a DataLoader worker) stopped by SIGTERM: not the parent's signal
            print("blocked", flush=True)
            child = os.fork()
            if child == 0:
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                finally:
                    os._exit(0)
            os.waitpid(child, 0)
            time.sleep(1.0)
            raise Interrupted(signal.SIGTERM)
except Interrupted:
    time.sleep(1.0)  # past the grace, outside the block: the watchdog is stopped
    print("alive", flush=True)
"""


@pytest.mark.parametrize("where", ["in-c", "in-python", "in-a-child"])
def test_signals_raise_ends_a_process_blocked_in_c_after_the_grace(tmp_path, where):
    script = tmp_path / "blocked.py"
    script.write_text(_BLOCKED)
    env = {**os.environ, "LEADER_EDGE_SIGNAL_GRACE": "0.3"}
    p = subprocess.Popen([sys.executable, str(script), where], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "blocked"
        t0 = time.monotonic()
        if where != "in-a-child":
            p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=20)
        waited = time.monotonic() - t0
    finally:
        p.kill()
    out, err = p.communicate()
    if where == "in-c":
        assert rc == 143 and 0.3 <= waited < 20 and "still running 0.3 s after SIGTERM" in err, err
    else:
        assert rc == 0 and out.strip() == "alive", err


def test_cli_refuses_a_bad_signal_grace(monkeypatch):
    from click.testing import CliRunner

    from leader_edge.cli import main

    monkeypatch.setenv("LEADER_EDGE_SIGNAL_GRACE", "soon")
    result = CliRunner().invoke(main, ["synth", "--help"])
    assert result.exit_code == 2 and "LEADER_EDGE_SIGNAL_GRACE='soon'" in result.output, result.output


def test_nested_signals_raise_leaves_the_outer_block_in_charge():
    """predict_file runs its own block for library callers; under the CLI's it adds no second
    watchdog, and one signal raises once."""
    def watchdogs() -> int:
        return sum(t.name == "leader-edge-signal-watchdog" for t in threading.enumerate())

    before = watchdogs()
    caught = []
    try:
        with signals_raise():
            assert watchdogs() == before + 1
            try:
                with signals_raise():
                    assert watchdogs() == before + 1
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(5)  # the handler raises between bytecodes
            except Interrupted as e:
                caught.append(e)
                os.kill(os.getpid(), signal.SIGINT)  # during the cleanup: ignored, as for one block
                time.sleep(0.2)
                caught.append("cleanup done")  # a second Interrupted would have left before this
                raise
    except Interrupted as e:
        caught.append(e)
    assert caught[1] == "cleanup done" and caught[2] is caught[0] and caught[0].signum == signal.SIGINT
    with signals_raise():  # and a block after the first one is in charge again
        assert watchdogs() == before + 1


def test_atomic_file_writes_through_a_link_and_into_a_fifo_in_place(tmp_path):
    """A rename over the output path replaced a symbolic link with a regular file (its target kept
    the old data) and a device with a regular file (/dev/full "succeeded")."""
    target = tmp_path / "target.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target.name)
    atomic_write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)  # never hangs the suite
    reader.start()
    atomic_write_text(fifo, "through the pipe")
    reader.join(10)
    assert got == ["through the pipe"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "pipe", "target.json"]
