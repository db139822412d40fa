"""Small file utilities every layer uses: digests, atomic writes, a lock between processes.

    sha256(path)                                  # hex digest, read in 1 MiB blocks
    with atomic_file(path) as tmp: write(tmp)     # tmp beside path; replaces path only on success
    atomic_write_text(path, text)                 # the same for a text
    with atomic_directory(d, marker=..., what=...) as tmp: ...   # a whole directory, swapped in at the end
    with file_lock(path): ...                     # exclusive between processes (filelock)

No output is ever left half-written: a failure (or Ctrl-C) removes the temporary and leaves the
old file or directory as it was. Torch-free and numpy-free, so the bedside runtime can use it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from leader_edge.errors import DataError


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp file path beside `path` (same suffix, so writers that look at it still work);
    on success it replaces `path`, on any error it is removed."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_directory(directory: str | Path, *, marker: str, what: str) -> Iterator[Path]:
    """Yield a temp directory beside `directory`; on success it replaces `directory`, on any
    error it is removed, so no half-written output is ever left.

    An existing `directory` is replaced only when it is empty or holds `marker` (a file that a
    previous run of the same writer left there): anything else is refused, not overwritten.
    """
    out = Path(directory)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).exists())):
        raise DataError(out, f"exists and is not a {what} directory", fix="choose a new --out path or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed) across processes, e.g. so that two runs
    convert a model into the cache once. filelock: maintained, and portable beyond POSIX flock."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield
