"""Frozen-layer states on disk: shards, any write order, bf16 storage, views, stale caches, damaged shards."""

import json
import re
import struct

import numpy as np
import pytest
import torch

from leader_edge.errors import StateError
from leader_edge.train import state_store
from leader_edge.train.state_store import Pick, StateStore, lengths_of


def test_state_store_round_trip_across_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(state_store, "SHARD_BYTES", 1000)  # a few samples per shard
    rng = torch.Generator().manual_seed(0)
    states = [torch.randn(int(n), 8, generator=rng) for n in (3, 17, 1, 9, 30, 5)]
    store = StateStore.create(tmp_path / "s", len(states))
    for i in (4, 0, 2, 5, 1, 3):  # length-bucketed order, not row order
        store.put(i, states[i])
    store.close()
    assert len(list((tmp_path / "s").glob("shard-*.safetensors"))) >= 2  # 2,080 bytes in 1,000-byte shards
    assert lengths_of(store).tolist() == [3, 17, 1, 9, 30, 5]
    for i, s in enumerate(states):
        assert torch.equal(store[i], s)
    view = Pick([store, [torch.zeros(2, 8)]], [(1, 0), (0, 4)])
    assert view.lengths.tolist() == [2, 30] and torch.equal(view[1], states[4])
    store.remove()
    assert not (tmp_path / "s").exists()


def test_state_store_bf16_storage_reads_fp32_and_keeps_ids(tmp_path):
    store = StateStore.create(tmp_path / "s", 2, dtype=torch.bfloat16)
    x = torch.randn(4, 3)
    store.put(0, x)
    store.put(1, torch.tensor([5, 6, 7]))
    store.close()
    assert store[0].dtype == torch.float32 and torch.allclose(store[0], x, atol=2e-2)
    assert store[1].dtype == torch.int64 and store[1].tolist() == [5, 6, 7]
    with pytest.raises(IndexError, match="never written"):
        StateStore.create(tmp_path / "t", 1)[0]


def test_stale_cache_of_a_killed_run_is_replaced(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "shard-00000.safetensors").write_bytes(b"half-written")
    store = StateStore.create(tmp_path / "s", 1)
    assert not (tmp_path / "s" / "shard-00000.safetensors").exists()
    store.put(0, torch.ones(2, 2))
    store.close()
    assert np.array_equal(store[0].numpy(), np.ones((2, 2)))


def _damage_header(shard, change) -> None:
    """Apply `change` to a shard's safetensors header in place, its size kept (space-padded, as written)."""
    data = bytearray(shard.read_bytes())
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= size
    data[8 : 8 + size] = text.ljust(size)
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda h: h.update({"7": h.pop("1")}), "its header has no sample 1"),
    (lambda h: h["1"].update(dtype="F64"), "sample 1 has dtype 'F64', not one of"),
])
def test_state_store_damaged_shard_named_with_the_fix(tmp_path, damage, message):
    """A shard whose header lost a sample or names a dtype the store never writes: the error names the
    shard file and says to rerun the stage (was a bare KeyError: '1' / 'F64')."""
    store = StateStore.create(tmp_path / "s", 2)
    store.put(0, torch.ones(2, 3))
    store.put(1, torch.zeros(4, 3))
    store.close()
    shard = tmp_path / "s" / "shard-00000.safetensors"
    _damage_header(shard, damage)
    assert torch.equal(store[0], torch.ones(2, 3))  # the undamaged sample still reads
    want = rf"^{re.escape(str(shard))}: {message}.*; the frozen-state cache is damaged - rerun the stage$"
    with pytest.raises(StateError, match=want):
        store[1]


def _cut(n: int):
    return lambda data: data[:n]


@pytest.mark.parametrize("damage, message", [
    (_cut(5), "it is 5 bytes long, shorter than a safetensors header size"),
    (_cut(20), "header is cut short or not a JSON object"),  # the size names more bytes than remain
    (lambda d: d[:8] + b"[" + d[9:], "header is cut short or not a JSON object"),  # not JSON
    (lambda d: d[:8] + b"\xff" + d[9:], "header is cut short or not a JSON object"),  # not UTF-8
    (lambda d: d[:8] + b"[1, 2]".ljust(struct.unpack("<Q", d[:8])[0]) + d[8 + struct.unpack("<Q", d[:8])[0]:],
     "header is cut short or not a JSON object"),  # JSON, not an object
])
def test_state_store_cut_or_garbled_shard_header_is_named(tmp_path, damage, message):
    """A shard cut short (a full disk, a killed copy) or with a garbled header: StateError naming the
    shard and the fix (was struct.error / JSONDecodeError / UnicodeDecodeError tracebacks)."""
    store = StateStore.create(tmp_path / "s", 1)
    store.put(0, torch.ones(2, 3))
    store.close()
    shard = tmp_path / "s" / "shard-00000.safetensors"
    shard.write_bytes(damage(shard.read_bytes()))
    with pytest.raises(StateError, match=rf"^{re.escape(str(shard))}: .*{re.escape(message)}.*rerun the stage$"):
        store[0]


def test_state_store_offsets_that_disagree_with_the_shape_or_the_file_are_named(tmp_path):
    store = StateStore.create(tmp_path / "s", 1)
    store.put(0, torch.ones(2, 3))
    store.close()
    shard = tmp_path / "s" / "shard-00000.safetensors"
    _damage_header(shard, lambda h: h["0"].update(shape=[4, 3]))
    with pytest.raises(StateError, match=r"sample 0 has shape \[4, 3\] and data offsets .* do not agree"):
        store[0]
    store = StateStore.create(tmp_path / "t", 1)
    store.put(0, torch.ones(2, 3))
    store.close()
    shard = tmp_path / "t" / "shard-00000.safetensors"
    # a shape and offsets that agree but lie past the file's end: refused before allocating what they
    # claim (a claim of gigabytes was an allocator error)
    size = {"BF16": 2, "F16": 2, "F32": 4}
    _damage_header(shard, lambda h: h["0"].update(shape=[9_999, 3], data_offsets=[0, 9_999 * 3 * size[h["0"]["dtype"]]]))
    with pytest.raises(StateError, match="sample 0 ends past the end of the file"):
        store[0]


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads RssFile from Linux's /proc")
def test_state_store_reads_do_not_keep_the_store_in_rss(tmp_path, monkeypatch):
    monkeypatch.setattr(state_store, "SHARD_BYTES", 4 << 20)
    store = StateStore.create(tmp_path / "s", 40)
    for i in range(40):
        store.put(i, torch.full((256, 1024), float(i)))  # 1 MiB each: 40 MiB in 10 shards
    store.close()
    before = _rss_file_kb()
    for _ in range(2):  # two epochs, every byte read (as pad_states copies each sample)
        for i in range(40):
            assert torch.equal(store[i], torch.full((256, 1024), float(i)))
    # a memory-mapped shard keeps every page read in the process's RSS: +40 MiB here (+993 MB in
    # benchmarks/bench_teacher_memory.py), the whole store at scale; positioned reads leave the
    # pages to the kernel's page cache
    assert _rss_file_kb() - before < 8 * 1024


def _store_of(tmp_path, n: int = 30) -> StateStore:
    store = StateStore.create(tmp_path / "s", n)
    for i in range(n):
        store.put(i, torch.full((i % 4 + 1, 3), float(i)))
    return store.close()


def test_state_store_opens_each_shard_once(tmp_path, monkeypatch):
    """One descriptor per shard for every read (an open per sample is a round trip on NFS); remove()
    closes them."""
    monkeypatch.setattr(state_store, "SHARD_BYTES", 200)  # several shards
    store = _store_of(tmp_path)
    opened, real_open = [], state_store.os.open
    monkeypatch.setattr(state_store.os, "open", lambda path, *a, **k: (opened.append(str(path)), real_open(path, *a, **k))[1])
    for _ in range(3):
        for i in range(len(store)):
            assert torch.equal(store[i], torch.full((i % 4 + 1, 3), float(i)))
    shards = sorted((tmp_path / "s").glob("shard-*.safetensors"))
    assert len(shards) > 2 and sorted(opened) == [str(s) for s in shards]
    fds = list(store._fds.values())
    store.remove()
    for fd in fds:
        with pytest.raises(OSError):
            state_store.os.fstat(fd)


def test_state_store_reads_in_a_forked_worker_do_not_disturb_the_parent(tmp_path):
    """A DataLoader worker forked after the parent opened a shard shares that descriptor: reads at a
    position (pread) leave no shared file offset for the two to fight over."""
    import multiprocessing

    store = _store_of(tmp_path)
    assert torch.equal(store[5], torch.full((2, 3), 5.0))  # the parent opens the shard before the fork
    ctx = multiprocessing.get_context("fork")  # Process args are not pickled under fork: the children share the fd
    workers = [ctx.Process(target=_sum_of_all, args=(store, tmp_path / f"sum{k}")) for k in range(3)]
    for w in workers:
        w.start()
    for _ in range(3):  # the parent reads meanwhile
        for i in range(len(store)):
            assert torch.equal(store[i], torch.full((i % 4 + 1, 3), float(i)))
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    want = 3 * sum(float(i) * (i % 4 + 1) * 3 for i in range(len(store)))
    assert [float((tmp_path / f"sum{k}").read_text()) for k in range(3)] == [want] * 3


def _sum_of_all(store: StateStore, out) -> None:
    assert store._fds  # inherited, not reopened
    out.write_text(repr(sum(float(store[i].sum()) for _ in range(3) for i in range(len(store)))))


def test_state_store_pickled_for_a_spawned_worker_opens_its_own_descriptors(tmp_path):
    import pickle  # what a spawn-context DataLoader does to its dataset; never used for user files

    store = _store_of(tmp_path)
    store[0]
    copy = pickle.loads(pickle.dumps(store))
    assert copy._fds == {} and torch.equal(copy[7], store[7])


def test_state_store_shard_removed_under_the_run_is_named(tmp_path):
    store = _store_of(tmp_path)
    (tmp_path / "s" / "shard-00000.safetensors").unlink()
    with pytest.raises(StateError, match=r"shard-00000.safetensors: the shard is gone; .*rerun the stage$"):
        store[0]


def test_state_store_keeps_at_most_max_open_shards_descriptors(tmp_path, monkeypatch):
    """A store of many shards (120 GB of fp32 states are ~470) keeps the last read open, not all:
    the soft limit on open files is often 1024."""
    monkeypatch.setattr(state_store, "SHARD_BYTES", 100)  # ~one sample per shard
    monkeypatch.setattr(state_store, "MAX_OPEN_SHARDS", 3)
    store = _store_of(tmp_path)
    for _ in range(2):
        for i in range(len(store)):
            assert torch.equal(store[i], torch.full((i % 4 + 1, 3), float(i)))
            assert len(store._fds) <= 3
    assert list(store._fds) == sorted(store._fds)[-3:]  # the last three read, oldest first


def test_close_stores_closes_the_descriptors_under_a_directory(tmp_path):
    """What the teacher stage's cleanup calls before removing the cache: a failed stage's stores
    live on in its traceback, and an open deleted shard keeps its disk space."""
    inside, outside = _store_of(tmp_path / "cache"), _store_of(tmp_path / "other")
    inside[0], outside[0]
    fds = list(inside._fds.values())
    state_store.close_stores(tmp_path / "cache")
    assert inside._fds == {} and len(outside._fds) == 1
    for fd in fds:
        with pytest.raises(OSError):
            state_store.os.fstat(fd)
    assert torch.equal(inside[3], torch.full((4, 3), 3.0))  # still readable: it reopens
