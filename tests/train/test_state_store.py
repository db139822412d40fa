"""Frozen-layer states on disk: shards, any write order, bf16 storage, views, stale caches."""

import numpy as np
import pytest
import torch

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
