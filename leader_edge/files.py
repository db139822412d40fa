"""Small file utilities every layer uses: digests, atomic writes, temp names, signals, a lock.

    sha256(path)                                  # hex digest, read in 1 MiB blocks
    with atomic_file(path) as tmp: write(tmp)     # tmp beside path; replaces path only on success
    atomic_write_text(path, text)                 # the same for a text
    with atomic_directory(d, marker=..., what=...) as tmp: ...   # a whole directory, swapped in at the end
    with temp_directory(path) as work: ...        # a private working directory beside path, always removed
    with signals_raise(): ...                     # SIGTERM/SIGINT raise Interrupted, so the above clean up
    with file_lock(path): ...                     # exclusive between processes (filelock)

No output is ever left half-written: a failure, SIGINT or (under `signals_raise`, which every CLI
command runs in) SIGTERM removes the temporary and leaves the old file or directory as it was.
A run killed outright (SIGKILL, power loss) cannot clean up; its temporaries carry the host and
process id in their names (`.NAME.leader-edge.HOST.PID.RAND.tmp[SUFFIX]`) and are held under an
flock while in use, so the next writer of the same output removes them once that process is gone
and nobody holds them (`remove_stale_temps`); a temporary that might be live is left alone.
New outputs get the mode the umask gives (0644 / 0755 under umask 022; inside a directory output,
every file and subdirectory), replaced ones keep theirs (`output_mode`); temporaries are private
(0600 / 0700) while they are written.
Torch-free and numpy-free, so the bedside runtime can use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from leader_edge.errors import DataError

log = logging.getLogger(__name__)

# `.NAME.` + this + `HOST.PID.RAND.tmp[SUFFIX]`: whose temporary it is (see `remove_stale_temps`).
TEMP_TAG = "leader-edge."
_TEMP_REST = re.compile(r"^(?P<host>.+)\.(?P<pid>\d+)\.(?P<rand>[0-9a-z]+)\.tmp(?P<suffix>\.[^.]*)?$")


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Modes and temp names


def output_mode(path: str | Path, *, directory: bool = False) -> int:
    """Permission bits for an output: those of the `path` it replaces, or what the umask gives a new
    file (0o666 & ~umask) or directory (0o777 & ~umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    """The process umask. Linux shows it in /proc (thread-safe); elsewhere set and restore it."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _host() -> str:
    return socket.gethostname().replace("/", "_")


def temp_tag() -> str:
    """`leader-edge.HOST.PID.`: the part of a temp name that says whose it is."""
    return f"{TEMP_TAG}{_host()}.{os.getpid()}."


def temp_path(path: str | Path, suffix: str = "") -> Path:
    """A fresh temp name beside `path`: `.NAME.leader-edge.HOST.PID.RAND.tmp` + `suffix` (nothing is created)."""
    path = Path(path)
    return path.parent / f".{path.name}.{temp_tag()}{secrets.token_hex(4)}.tmp{suffix}"


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temporaries for `path` (named by `temp_path`) that a killed run of this host left:
    its process is gone and no process holds the entry's flock. Anything else is left alone (another
    host's, a live process's, one that cannot be locked). Returns what was removed."""
    path = Path(path)
    prefix, host, removed = f".{path.name}.{TEMP_TAG}", _host(), []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for entry in names:
        m = _TEMP_REST.match(entry[len(prefix):]) if entry.startswith(prefix) else None
        if m is None or m["host"] != host or _alive(int(m["pid"])):
            continue
        stale = path.parent / entry
        try:
            fd = os.open(stale, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # removed meanwhile, a symlink, or unreadable: not ours to judge
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by whoever still writes it
            if os.path.isdir(stale) and not os.path.islink(stale):
                shutil.rmtree(stale)
            else:
                os.unlink(stale)
        except OSError:
            continue  # held, or removed by another run first: ignored either way
        finally:
            os.close(fd)
        log.warning("removed %s, left by an earlier run that was killed (process %s)", stale, m["pid"])
        removed.append(stale)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def hold(fd: int) -> None:
    """flock `fd` for as long as it is open: `remove_stale_temps` never removes a held entry."""
    with contextlib.suppress(OSError):  # no locks on this file system: the process id still protects it
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ---------------------------------------------------------------------------------------------
# Atomic outputs


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp file path beside `path` (same suffix, so writers that look at it still work);
    on success it replaces `path` with `output_mode(path)`, on any error it is removed. Stale
    temporaries of `path` from killed runs are removed first."""
    path = Path(path)
    remove_stale_temps(path)
    tmp = temp_path(path, path.suffix)  # named before it exists: an interrupt at any point knows what to remove
    fd = None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        hold(fd)
        yield tmp
        os.chmod(tmp, output_mode(path))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def _held_directory(path: Path) -> Iterator[Path]:
    """Create the private directory `path` (0700), held under an flock; removed on any error."""
    fd = None
    try:
        os.mkdir(path, 0o700)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        hold(fd)
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


@contextmanager
def atomic_directory(directory: str | Path, *, marker: str, what: str) -> Iterator[Path]:
    """Yield a temp directory beside `directory`; on success it replaces `directory` (with
    `output_mode`, and the umask's mode for everything inside), on any error it is removed, so no half-written output is ever left. Stale
    temporaries of `directory` from killed runs are removed first.

    An existing `directory` is replaced only when it is empty or holds `marker` (a file that a
    previous run of the same writer left there): anything else is refused, not overwritten.
    """
    out = Path(directory)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).exists())):
        raise DataError(out, f"exists and is not a {what} directory", fix="choose a new --out path or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    with _held_directory(temp_path(out)) as tmp:
        yield tmp
        _umask_modes(tmp)
        os.chmod(tmp, output_mode(out, directory=True))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)


def _umask_modes(directory: Path) -> None:
    """Give everything inside `directory` the mode the umask gives a new file or directory: some
    writers create private files whatever the umask (safetensors' save_file: 0600, so a student's
    model.safetensors was unreadable to the group that may read its config.json)."""
    umask = _umask()
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


@contextmanager
def temp_directory(path: str | Path) -> Iterator[Path]:
    """A private (0700) working directory beside `path`, named for it, removed at the end whatever
    happens; stale ones of killed runs are removed first. `path` itself is never created."""
    path = Path(path)
    remove_stale_temps(path)
    with _held_directory(temp_path(path)) as tmp:
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Signals


class Interrupted(SystemExit):
    """SIGTERM or SIGINT under `signals_raise`: raised in the main thread so that every temporary is
    removed on the way out. Exits 128 + the signal number (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


@contextmanager
def signals_raise() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT raise `Interrupted` (the default SIGTERM action ends
    the process at once, leaving its temporaries). The first signal raises; later ones are ignored
    while the cleanup it started runs (SIGKILL still ends the process; the next run then removes
    what it left). Only the main thread can take signals: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised: list[int] = []

    def interrupted(signum, frame):
        if raised:
            log.warning("%s: already stopping, cleaning up", signal.Signals(signum).name)
            return
        raised.append(signum)
        raise Interrupted(signum)

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in before:
        signal.signal(s, interrupted)
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed) across processes, e.g. so that two runs
    convert a model into the cache once. filelock: maintained, and portable beyond POSIX flock."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield
