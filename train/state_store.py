"""Frozen-layer states on disk: written once in safetensors shards, read back one batch at a time.

    store = StateStore.create(directory, n, dtype=torch.bfloat16)   # or float32; n samples
    store.put(i, state)             # [L_i, hidden] (or [L_i] token ids) of sample i, in any order
    store.close()                   # flushes the last shard; store[i] reads sample i, store.lengths[i] is L_i
    view = Pick([store_a, store_b], [(0, 3), (1, 0)])   # view[k] = sources[s][j] for (s, j) = where[k]

Host memory is bounded by one shard (`SHARD_BYTES`) while writing and by one batch while
reading: the states of 15,000 MIMIC-III prompts x ~500 tokens x 4096 dims would be ~120 GB in
fp32 in memory, and are a few shard files here. Each `store[i]` reads that sample's bytes with
one positioned read (pread on the shard's one descriptor, at offsets from its safetensors header,
parsed once), not through a memory map: the pages of a mapped shard, once touched, stay in the process's RSS until unmapped,
so reading every sample each epoch kept the whole store in RSS: peak RSS of the teacher stage grew
+993 MB when the states grew by 0.95 GB, +150 MB with positioned reads (benchmarks/bench_teacher_memory.py,
2026-12-02). The kernel's page cache still serves repeated reads.
The directory belongs to the run and is removed by `StateStore.remove()` when the stage ends.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from leader_edge.errors import StateError

SHARD_BYTES = 256 * 1024 * 1024  # 256 MiB per shard: few files, bounded writer memory
# Read descriptors a store keeps open, the last read: 120 GB of fp32 states are ~470 shards, and the
# soft limit on open files is often 1024. Past it the least recently read shard is reopened when needed.
MAX_OPEN_SHARDS = 128
_OPEN: "weakref.WeakSet[StateStore]" = weakref.WeakSet()  # stores that have opened a shard (`close_stores`)
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64, "I32": torch.int32}


class StateStore(Sequence):
    """A fixed-length sequence of per-sample tensors stored in safetensors shards."""

    def __init__(self, directory: Path, n: int, dtype: torch.dtype) -> None:
        self.directory = Path(directory)
        self.dtype = dtype
        self.lengths = np.zeros(n, dtype=np.int64)  # L_i of every sample, known without reading it
        self._where: list[tuple[int, str] | None] = [None] * n  # sample -> (shard, key)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards = 0
        self._headers: dict[int, dict] = {}  # shard -> its safetensors header (key -> dtype, shape, offsets)
        self._fds: OrderedDict[int, int] = OrderedDict()  # shard -> its read descriptor, least recently read first (`_fd`)
        self._lock = threading.Lock()

    @classmethod
    def create(cls, directory: str | Path, n: int, *, dtype: torch.dtype = torch.float32) -> "StateStore":
        directory = Path(directory)
        if directory.exists():
            shutil.rmtree(directory)  # a stale cache of a killed run: recomputed, never trusted
        directory.mkdir(parents=True)
        return cls(directory, n, dtype)

    def put(self, i: int, state: torch.Tensor) -> None:
        t = state.detach().to("cpu", self.dtype if state.is_floating_point() else state.dtype).contiguous()
        key = str(i)
        self._pending[key] = t
        self._where[i] = (self._shards, key)
        self.lengths[i] = t.shape[0]
        self._pending_bytes += t.numel() * t.element_size()
        if self._pending_bytes >= SHARD_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        from safetensors.torch import save_file

        save_file(self._pending, str(self.directory / f"shard-{self._shards:05d}.safetensors"))
        self._pending, self._pending_bytes = {}, 0
        self._shards += 1

    def close(self) -> "StateStore":
        self._flush()
        return self

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, i: int) -> torch.Tensor:
        where = self._where[i]
        if where is None:
            raise IndexError(f"sample {i} of the state store {self.directory} was never written")
        shard, key = where
        if shard == self._shards:  # still in the writer's buffer
            t = self._pending[key]
            return t.float() if t.is_floating_point() else t
        t = self._read(shard, key)
        return t.float() if t.is_floating_point() else t  # bf16 on disk, fp32 to compute

    def _read(self, shard: int, key: str) -> torch.Tensor:
        """One tensor of a shard file, read at its offset (safetensors layout: u64 header size, JSON
        header, data; offsets relative to the data)."""
        path = self.directory / f"shard-{shard:05d}.safetensors"
        with self._lock:  # no other thread closes the descriptor under this read
            return self._read_at(self._fd(shard, path), shard, key, path)

    def _read_at(self, fd: int, shard: int, key: str, path: Path) -> torch.Tensor:
        header = self._headers.get(shard)
        if header is None:
            header = self._headers[shard] = _read_header(fd, path)
        entry = header.get(key)
        if not isinstance(entry, dict):
            raise _damaged(path, f"its header has no sample {key}")
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise _damaged(path, f"sample {key} has dtype {entry.get('dtype')!r}, not one of {sorted(_DTYPES)}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]
                and offsets[1] - offsets[0] == math.prod(shape) * dtype.itemsize):
            raise _damaged(path, f"sample {key} has shape {shape!r} and data offsets {offsets!r}, which do not agree")
        begin, end = offsets
        if header["start"] + end > header["file_bytes"]:  # before allocating what the header claims
            raise _damaged(path, f"sample {key} ends past the end of the file (cut short)")
        out = torch.empty(shape, dtype=dtype)
        if _pread_into(fd, out.reshape(-1).view(torch.uint8).numpy(), header["start"] + begin) != end - begin:
            raise _damaged(path, f"short read of sample {key}")
        return out

    def _fd(self, shard: int, path: Path) -> int:
        """The shard's read descriptor, opened once (an open per sample is a server round trip on
        NFS), the `MAX_OPEN_SHARDS` last read kept open. Call with `_lock` held. Reads are
        positioned (pread), never seek + read: a descriptor a DataLoader worker inherits by fork
        shares its file offset with the parent, its pread does not."""
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StateError(f"{path}: the shard is gone; the frozen-state cache is damaged - rerun the stage") from None
        self._fds[shard] = fd
        if len(self._fds) > MAX_OPEN_SHARDS:
            os.close(self._fds.popitem(last=False)[1])
        _OPEN.add(self)
        return fd

    def _close_fds(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, OrderedDict()
            for fd in fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)

    def __getstate__(self) -> dict:  # a spawned DataLoader worker opens its own descriptors
        return {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _fds=OrderedDict(), _lock=threading.Lock())

    def __del__(self) -> None:
        if getattr(self, "_lock", None) is not None and self._fds:  # not when __init__ never ran to the end
            self._close_fds()

    def remove(self) -> None:
        self._close_fds()
        self._headers.clear()
        shutil.rmtree(self.directory, ignore_errors=True)


def close_stores(directory: str | Path) -> None:
    """Close the read descriptors of every store under `directory`, before it is removed: a stage
    that fails keeps its stores alive in the traceback, and a deleted shard that is still open keeps
    its disk space until the process ends (on NFS it becomes a `.nfsXXXX` file that blocks the rmdir)."""
    root = Path(directory).resolve()
    for store in list(_OPEN):
        if store.directory.resolve().is_relative_to(root):
            store._close_fds()


def _pread_into(fd: int, buffer: np.ndarray, offset: int) -> int:
    """Fill `buffer` from `fd` at `offset` (os.preadv may stop short of a large request); the bytes read."""
    view, done = memoryview(buffer).cast("B"), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:  # end of file
            break
        done += n
    return done


def _read_header(fd: int, path: Path) -> dict:
    """A shard's safetensors header (+ "start", the data's offset, and "file_bytes", the shard's
    size, read once with the header: a shard is complete before it is read), or `_damaged` when the file is
    cut short or the header is not the JSON object the store wrote."""
    raw = os.pread(fd, 8, 0)
    if len(raw) < 8:
        raise _damaged(path, f"it is {len(raw)} bytes long, shorter than a safetensors header size")
    (size,) = struct.unpack("<Q", raw)
    file_bytes = os.fstat(fd).st_size
    text = os.pread(fd, size, 8) if size <= file_bytes - 8 else b""
    try:
        header = json.loads(text) if len(text) == size else None
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        header = None
    if not isinstance(header, dict):
        raise _damaged(path, f"its {size:,}-byte header is cut short or not a JSON object")
    return {**header, "start": 8 + size, "file_bytes": file_bytes}


def _damaged(path: Path, what: str) -> StateError:
    """A shard that does not hold what the store wrote: named, with the fix (the store is a cache)."""
    return StateError(f"{path}: {what}; the frozen-state cache is damaged - rerun the stage")


class Pick(Sequence):
    """view[k] = sources[s][j] for (s, j) = where[k]: samples gathered from several stores, no copies."""

    def __init__(self, sources: list[Sequence], where: list[tuple[int, int]]) -> None:
        self.sources, self.where = sources, list(where)
        lens = [lengths_of(src) for src in sources]  # once per source: an in-memory list is walked once
        self.lengths = np.array([lens[s][j] for s, j in self.where], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, k: int) -> torch.Tensor:
        s, j = self.where[k]
        return self.sources[s][j]


def lengths_of(states: Sequence) -> np.ndarray:
    """[N] first-dimension sizes: the store's record, or read off in-memory tensors."""
    lengths = getattr(states, "lengths", None)
    return lengths if lengths is not None else np.array([t.shape[0] for t in states], dtype=np.int64)
