"""Samples -> token ids -> length-bucketed, right-padded batches; the frozen-layer cache.

Bucketing matters on CPU: prompts range from ~80 to ~640 tokens (synth), and padding a random
batch to its longest prompt wastes ~45% of the compute; sorted buckets waste < 3%.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from leader_edge.data.dataset import Dataset
from leader_edge.data.splits import Sample
from leader_edge.train.prompts import build_prompt

log = logging.getLogger(__name__)


FEATURES = "features.safetensors"  # RUN/teacher's distilled states: one row per sample_key, per split


def sample_key(sample: Sample) -> str:
    """The key that joins teacher features to student samples: patient_id/visit_id of the current visit."""
    return f"{sample.patient_id}/{sample.target.visit_id}"


@dataclass
class Encoded:
    """Token ids and labels of a list of samples, row i = samples[i].

    Attributes:
        keys: N sample keys.
        ids: N token id lists, each ending with EOS.
        labels: [N, M] float32 multi-hot over `med_codes`.
    """

    samples: list[Sample]
    keys: list[str]
    ids: list[list[int]]
    labels: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(i) for i in self.ids], dtype=np.int64)

    def subset(self, rows: list[int]) -> "Encoded":
        return Encoded([self.samples[i] for i in rows], [self.keys[i] for i in rows], [self.ids[i] for i in rows], self.labels[rows])


def encode_prompt(ds: Dataset, sample: Sample, tokenizer, *, max_history: int, max_tokens: int) -> list[int]:
    """Token ids of a sample's prompt + EOS (LEADER appends one), oldest history dropped to fit."""
    eos = tokenizer.eos_token_id

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False)) + 1

    text = build_prompt(ds, sample, max_history=max_history, max_tokens=max_tokens, count_tokens=count)
    return tokenizer.encode(text, add_special_tokens=False) + [eos]


def encode_samples(ds: Dataset, samples: list[Sample], tokenizer, med_codes: list[str], *, max_history: int, max_tokens: int) -> Encoded:
    """Encode every sample (prompt ids + multi-hot target)."""
    index = {c: j for j, c in enumerate(med_codes)}
    labels = np.zeros((len(samples), len(med_codes)), dtype=np.float32)
    for i, s in enumerate(samples):
        labels[i, [index[c] for c in s.target.medications if c in index]] = 1.0
    ids = [encode_prompt(ds, s, tokenizer, max_history=max_history, max_tokens=max_tokens) for s in samples]
    return Encoded(list(samples), [sample_key(s) for s in samples], ids, labels)


def length_batches(lengths: np.ndarray, batch_size: int, *, max_tokens: int | None = None, seed: int | None = None) -> list[list[int]]:
    """Row indices grouped into batches of similar length.

    Args:
        lengths: [N] token counts.
        batch_size: at most this many rows per batch.
        max_tokens: also at most this many padded tokens per batch (None: no limit).
        seed: shuffle the batch order (and ties) with this seed; None keeps ascending length.
    """
    rng = random.Random(seed)
    order = sorted(range(len(lengths)), key=lambda i: (int(lengths[i]), rng.random() if seed is not None else i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = max(int(lengths[i]), int(lengths[cur[-1]]) if cur else 0)
        if cur and (len(cur) >= batch_size or (max_tokens is not None and longest * (len(cur) + 1) > max_tokens)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    if seed is not None:
        rng.shuffle(batches)
    return batches


def pad_batch(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: ([B, T] int64 ids, [B] int64 lengths)."""
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.int64)
    out = torch.full((len(ids), int(lengths.max())), pad_id, dtype=torch.int64)
    for r, x in enumerate(ids):
        out[r, : len(x)] = torch.tensor(x, dtype=torch.int64)
    return out, lengths


def pad_states(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad cached [L_i, hidden] (or [L_i] ids) tensors: ([B, T, ...], [B] lengths)."""
    lengths = torch.tensor([s.shape[0] for s in states], dtype=torch.int64)
    out = states[0].new_zeros((len(states), int(lengths.max()), *states[0].shape[1:]))
    for r, s in enumerate(states):
        out[r, : s.shape[0]] = s
    return out, lengths


@torch.no_grad()
def lower_cache(model, enc: Encoded, *, batch_tokens: int, device: torch.device, progress=None, store=None):
    """The frozen lower part of every sample, unpadded: [L_i, hidden] per sample (CPU), or [L_i]
    token ids when nothing is frozen.

    Computed once per sample (exact, see teacher_model); `progress(n_tokens)` is called per batch.
    With `store` (a `state_store.StateStore` of len(enc.ids)), the states go to its disk shards and
    the closed store is returned, so host memory stays bounded by a shard; else a list in memory.
    """
    out: list[torch.Tensor | None] = [None] * len(enc.ids)
    pad = model.tokenizer.pad_token_id
    start = time.perf_counter()
    for batch in length_batches(enc.lengths, 1 << 30, max_tokens=batch_tokens):
        ids, lengths = pad_batch([enc.ids[i] for i in batch], pad)
        states = model.lower(ids.to(device), lengths.to(device)).cpu()
        for r, i in enumerate(batch):
            if store is not None:
                store.put(i, states[r, : lengths[r]])
            else:
                out[i] = states[r, : lengths[r]].clone()
        if progress is not None:
            progress(int(lengths.sum()))
    log.info("lower-layer cache: %d samples, %d tokens in %.1f s", len(out), int(enc.lengths.sum()), time.perf_counter() - start)
    return store.close() if store is not None else out
