"""Small file utilities every layer uses: digests, atomic writes, temp names, a lock.

    sha256(path)                                  # hex digest, read in 1 MiB blocks
    with atomic_file(path) as tmp: write(tmp)     # tmp beside path; replaces path only on success
    with held_temp(path) as held: ...             # the same temporary, written through held.fd; the caller renames it
    atomic_write_text(path, text)                 # the same for a text
    with atomic_directory(d, marker=..., what=...) as tmp: ...   # a whole directory, swapped in at the end
    with temp_directory(path) as work: ...        # a private working directory beside path, always removed
    (leader_edge.signals.signals_raise: SIGTERM/SIGINT raise Interrupted, so the above clean up)
    with file_lock(path): ...                     # exclusive between processes (filelock)

No output is ever left half-written: a failure, SIGINT or (under `signals_raise`, which every CLI
command runs in) SIGTERM removes the temporary and leaves the old file or directory as it was.
A run killed outright (SIGKILL, power loss) cannot clean up; its temporaries carry the host and
process id in their names (`.NAME.leader-edge.HOST.PID.RAND.tmp[SUFFIX]`) and are held under an
flock while in use (a temp directory: its sidecar `<temp dir>.lock`), so the next writer of the same
output removes them once that process is gone and nobody holds them (`remove_stale_temps`); a
temporary that might be live is left alone. A process blocked outside Python when the signal comes
(a gloo/NCCL collective) cannot raise: it exits 128 + signal after a grace period without cleanup
(`leader_edge.signals`, LEADER_EDGE_SIGNAL_GRACE).
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
import socket
import stat
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from leader_edge.errors import DataError
from leader_edge.signals import signals_deferred

log = logging.getLogger(__name__)

# `.NAME.` + this + `HOST.PID.RAND.tmp[SUFFIX]`: whose temporary it is (see `remove_stale_temps`).
TEMP_TAG = "leader-edge."
# A trailing `.lock` is a temp directory's sidecar lock file (`_sidecar`).
_TEMP_REST = re.compile(r"^(?P<host>.+)\.(?P<pid>\d+)\.(?P<rand>[0-9a-z]+)\.tmp(?P<suffix>\.[^.]*)?(?:\.lock)?$")
_ASIDE = ".old"  # suffix of the old copy of a directory output while the new one is swapped in
_LOCK = ".lock"


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
    its process is gone and no process holds the entry's lock. Anything else is left alone (another
    host's, a live process's, one that cannot be locked). Returns what was removed.

    The lock of a temp file is an flock on the file, of a temp directory one on its sidecar file
    `<temp dir>.lock` (made before the directory and removed after it, see `_held_directory`); a
    sidecar whose directory is gone is removed like a temp file. Both are opened for writing: on NFS
    (the shared file system multi-node runs need) flock is a POSIX lock, whose LOCK_EX fails with
    EBADF on a descriptor opened read-only - every stale temp was skipped there - and a directory
    cannot be opened for writing at all. The old copy of a directory output set aside while its new
    one is swapped in (`.old`, see `atomic_directory`) is renamed back when the output is missing (a
    run killed between the two renames), and removed otherwise."""
    path = Path(path)
    prefix, host, removed = f".{path.name}.{TEMP_TAG}", _host(), []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for entry in sorted(names):
        m = _TEMP_REST.match(entry[len(prefix):]) if entry.startswith(prefix) else None
        if m is None or m["host"] != host or _alive(int(m["pid"])):
            continue
        stale = path.parent / entry
        try:
            mode = os.lstat(stale).st_mode
        except OSError:
            continue  # removed meanwhile
        directory = stat.S_ISDIR(mode)
        if directory:
            lock, flags = _sidecar(stale), os.O_CREAT  # a killed writer's sidecar may be gone, or never made
        elif stat.S_ISREG(mode) and not (entry.endswith(_LOCK) and _is_dir(path.parent / entry[:-len(_LOCK)])):
            lock, flags = stale, 0
        else:
            continue  # a symlink, a special file, or the sidecar of a directory (locked with it): not ours
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | flags, 0o600)
        except OSError:
            continue  # removed meanwhile, or not writable: not ours to judge
        restore = directory and m["suffix"] == _ASIDE and not os.path.lexists(path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held by whoever still writes it
            try:
                if restore:
                    os.rename(stale, path)
                elif directory:
                    shutil.rmtree(stale)
                else:
                    os.unlink(stale)
            except OSError:
                continue  # removed by another run first, or not ours to remove
            finally:
                if directory:
                    with contextlib.suppress(OSError):
                        os.unlink(lock)  # still under the lock
        finally:
            os.close(fd)
        if restore:
            log.warning("restored %s from %s, set aside by a run that was killed while replacing it (process %s)",
                        path, stale, m["pid"])
        else:
            log.warning("removed %s, left by an earlier run that was killed (process %s)", stale, m["pid"])
            removed.append(stale)
    return removed


def _sidecar(directory: Path) -> Path:
    """The file whose flock holds the temp directory `directory` (a directory cannot be opened for
    writing, which NFS's emulated flock needs)."""
    return directory.with_name(directory.name + _LOCK)


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def hold(fd: int) -> None:
    """flock `fd` for as long as it is open: `remove_stale_temps` never removes a held entry. `fd`
    must be open for writing (O_WRONLY or O_RDWR): on NFS flock is a POSIX lock, and LOCK_EX on a
    read-only descriptor fails. A directory is held through its sidecar (`_held_directory`)."""
    with contextlib.suppress(OSError):  # no locks on this file system: the process id still protects it
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ---------------------------------------------------------------------------------------------
# Atomic outputs


class HeldTemp:
    """A temporary made by `held_temp`: its `path`, and `fd`, open for writing and held (`hold`)
    until `close()`."""

    def __init__(self, path: Path) -> None:
        self.path, self.fd = path, None

    def close(self) -> None:
        """Close the descriptor (on NFS a failed write may only show here); a second call does nothing."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


@contextmanager
def held_temp(path: str | Path, suffix: str = "") -> Iterator[HeldTemp]:
    """A fresh temporary for the output `path` (`temp_path`, created O_EXCL with mode 0600 and held),
    after the stale temporaries of `path` left by killed runs are removed. On any error in the block
    it is removed; its descriptor is closed when the block ends. On success the block has renamed or
    removed it (every writer of an output goes through here: `atomic_file`, `predict_file`)."""
    path = Path(path)
    remove_stale_temps(path)
    held = HeldTemp(temp_path(path, suffix))  # named before it exists: an interrupt at any point knows what to remove
    try:
        held.fd = os.open(held.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        hold(held.fd)
        yield held
    except BaseException:
        with contextlib.suppress(OSError):  # a close error (NFS) must not hide the error that ended the block
            held.close()
        held.path.unlink(missing_ok=True)  # after a completed rename there is nothing here: the new file stays
        raise
    finally:
        held.close()


def output_target(path: str | Path) -> tuple[Path, bool]:
    """(where an output named `path` is written, whether in place): a symbolic link is followed
    (the link stays, its target gets the new file), and a device or FIFO (/dev/null, a pipe) is
    written in place: a rename over it replaced the device with a regular file, and /dev/full
    reported success."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode  # through any links: /dev/stdout -> /proc/self/fd/1 -> a pipe
    except FileNotFoundError:
        mode = None
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return path, True  # opened by the name given: the resolved name of a pipe ("pipe:[123]") is no path
    return (Path(os.path.realpath(path)) if path.is_symlink() else path), False


def copy_into(src: Path, target: Path) -> None:
    """Copy a finished temporary into a device or FIFO `target` (see `output_target`)."""
    with open(src, "rb") as f, open(target, "wb") as out:
        shutil.copyfileobj(f, out)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp file path beside `path` (same suffix, so writers that look at it still work);
    on success it replaces `path` with `output_mode(path)`, on any error it is removed. Stale
    temporaries of `path` from killed runs are removed first. A link is written through, a device
    or FIFO in place once the temporary (in the temp dir) is complete (`output_target`)."""
    path, in_place = output_target(path)
    if in_place:
        import tempfile

        with held_temp(Path(tempfile.gettempdir()) / path.name, path.suffix) as held:
            yield held.path
            held.close()
            copy_into(held.path, path)
            held.path.unlink()
        return
    with held_temp(path, path.suffix) as held:
        yield held.path
        held.close()  # before the rename: nothing can fail once `path` is the new file
        os.chmod(held.path, output_mode(path))
        os.replace(held.path, path)  # one step: `path` is the old file or the new one at every moment, no window to guard


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def _held_directory(path: Path) -> Iterator[Path]:
    """Create the private directory `path` (0700), held under an flock on its sidecar `path.lock`
    (made first, removed last, so the directory is never unheld while it exists); on any error the
    directory is removed."""
    lock = _sidecar(path)
    fd = None
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        hold(fd)
        os.mkdir(path, 0o700)
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            lock.unlink(missing_ok=True)
            os.close(fd)


@contextmanager
def atomic_directory(directory: str | Path, *, marker: str, what: str, owns: Collection[str] | None = None,
                     is_ours: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temp directory beside `directory`; on success it replaces `directory` (with
    `output_mode`, and the umask's mode for everything inside), on any error it is removed, so no
    half-written output is ever left and the old directory is left as it was. Stale temporaries of
    `directory` from killed runs are removed first.

    The swap renames the old directory aside (`.NAME.leader-edge.HOST.PID.RAND.tmp.old`), renames
    the new one in, then removes the old copy: one of the two always exists (removing the old one
    first lost both to a SIGTERM between the two steps), a failed rename puts the old one back, and
    SIGTERM/SIGINT are held back until both renames are done (`signals.signals_deferred`). A run killed
    outright between them leaves the old copy aside; the next writer renames it back.

    An existing `directory` is replaced only when it is empty or holds `marker` (a file that a
    previous run of the same writer left there; `is_ours(marker path)` may check its content):
    anything else is refused, not overwritten. With `owns` (every name the writer may put there),
    it must also hold nothing else: a folder of someone else's files with a file named like the
    marker was replaced whole, the files lost.
    """
    out = Path(directory)
    if out.exists():
        entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
        ours = entries is not None and (not entries or (out / marker).is_file() and (is_ours is None or is_ours(out / marker)))
        if not ours:
            raise DataError(out, f"exists and is not a {what} directory", fix="choose a new --out path or remove it")
        foreign = [n for n in entries if owns is not None and n not in owns]
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise DataError(out, f"holds {shown}, which a {what} directory does not: replacing it would delete "
                                 f"{'them' if len(foreign) > 1 else 'it'}", fix="move those elsewhere, or choose a new --out path")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    with _held_directory(temp_path(out)) as tmp:
        yield tmp
        _umask_modes(tmp)
        os.chmod(tmp, output_mode(out, directory=True))
        _swap_in(tmp, out)


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the directory `tmp` to `out`, replacing what is there (see `atomic_directory`)."""
    aside = None
    try:
        with signals_deferred():
            if os.path.lexists(out):
                aside = temp_path(out, _ASIDE)
                os.rename(out, aside)
            try:
                os.replace(tmp, out)
            except BaseException:
                if aside is not None:
                    os.rename(aside, out)
                    aside = None
                raise
    finally:
        if aside is not None:  # the new output is in place; a signal now leaves this to the next run
            if _is_dir(aside):
                shutil.rmtree(aside)
            else:
                aside.unlink()


def _umask_modes(directory: Path) -> None:
    """Give everything inside `directory` the mode the umask gives a new file or directory: some
    writers create private files whatever the umask (safetensors' save_file: 0600, so a student's
    model.safetensors was unreadable to the group that may read its config.json). A file with an
    executable bit gets 0o777 & ~umask (it stays executable), others 0o666 & ~umask. Symlinks are
    skipped and never followed: os.walk lists one to a directory among the directories, and chmod
    through it changed a directory outside the output."""
    umask = _umask()
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode  # the directory is private (0700) and ours: nobody swaps in a link
            if stat.S_ISDIR(mode) or (stat.S_ISREG(mode) and mode & 0o111):
                os.chmod(path, 0o777 & ~umask)
            elif stat.S_ISREG(mode):
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


@contextmanager
def file_lock(path: str | Path, *, timeout: float = -1) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed) across processes, e.g. so that two runs
    convert a model into the cache once. filelock: maintained, and portable beyond POSIX flock.
    `timeout`: seconds to wait (-1: for ever; 0: not at all); past it filelock.Timeout is raised."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path), timeout=timeout):
        yield
