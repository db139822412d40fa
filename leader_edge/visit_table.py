"""A chunk of visits as columns, and its encoding for the student in whole-chunk numpy passes.

The bedside reader (`leader_edge.visit_stream`) yields `VisitTable`s: one list per CSV column,
patients as row ranges. `encode_table` turns the code columns into per-visit id arrays once
(`TableCodes`) and `TableCodes.batch` gathers any set of target visits into the same `Batch`
that `Encoder.encode` builds from their histories (same ids, caps, padding widths, unknown
counts; `tests/test_visit_table.py` holds them equal). Per-patient Python was the largest share
of `predict` (encoding 2.5 s of 5.5 s per 32k patients); here the per-code work is `str.split`,
a `dict.get` through `map`, and numpy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from leader_edge.encoding import KINDS, PAD, Batch, Encoder, RawVisit

CODE_COLUMNS = ("diagnoses", "procedures", "medications")  # the CSV columns of KINDS, in order


@dataclass
class Patient:
    """One patient's visits in time order; `visit_ids[i]` and `lines[i]` belong to `visits[i]`."""

    patient_id: str
    visit_ids: list[str]
    lines: list[int]
    visits: list[RawVisit]


@dataclass
class VisitTable(Sequence):
    """R visits of P whole patients, in file order. Also a sequence of `Patient`s (built on access).

    Attributes:
        patient_ids: P ids.
        starts: int64 [P + 1] row offsets; patient p owns rows starts[p]:starts[p + 1].
        visit_ids: R ids. lines: int64 [R] file line of each row.
        codes: CSV code column ("diagnoses", ...) -> R texts, canonical `a;b;c` ("" = no codes).
        profile: field (no prefix) -> R stripped values, for the profile columns of the file.
    """

    patient_ids: list[str]
    starts: np.ndarray
    visit_ids: list[str]
    lines: np.ndarray
    codes: dict[str, list[str]]
    profile: dict[str, list[str]]

    def __len__(self) -> int:
        return len(self.patient_ids)

    def __getitem__(self, p):
        if isinstance(p, slice):
            return [self[i] for i in range(*p.indices(len(self)))]
        if not -len(self) <= p < len(self):
            raise IndexError(f"patient {p} of a chunk of {len(self)}")
        p %= len(self)
        a, b = int(self.starts[p]), int(self.starts[p + 1])
        split = [[t.split(";") if t else [] for t in self.codes[c][a:b]] for c in CODE_COLUMNS]
        visits = [RawVisit(d, pr, m, [(f, v[r]) for f, v in self.profile.items()])
                  for r, d, pr, m in zip(range(a, b), *split)]
        return Patient(self.patient_ids[p], self.visit_ids[a:b], self.lines[a:b].tolist(), visits)

    def __iter__(self) -> Iterator[Patient]:
        return (self[p] for p in range(len(self)))


def _kind_ids(index: dict[str, int], texts: list[str], max_codes: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One code column -> (int64 [R, W] known ids, first occurrence, first `max_codes`, -1 padded;
    int64 [R] kept lengths; int64 [R] unknown codes; int64 [R] codes as written; int64 [R] distinct
    known codes beyond `max_codes`, which the model never reads), as `Encoder._ids`."""
    r = len(texts)
    tokens = ";".join(texts).split(";")  # an empty text still leaves one "" token
    per_row = np.fromiter(map(str.count, texts, repeat(";")), dtype=np.int64, count=r) + 1
    written = np.where(np.fromiter(map(bool, texts), dtype=bool, count=r), per_row, 0)
    row = np.repeat(np.arange(r), per_row)
    ids = np.fromiter(map(index.get, tokens, repeat(-1)), dtype=np.int64, count=len(tokens))
    real = written[row] > 0  # drops the "" token of an empty text
    unknown = np.bincount(row[real & (ids < 0)], minlength=r)
    known = real & (ids >= 0)
    row, ids = row[known], ids[known]
    key = row * (max(index.values(), default=0) + 1) + ids
    by_key = np.argsort(key, kind="stable")  # equal keys (a code repeated in a visit) in file order
    again = np.zeros(len(key), dtype=bool)
    again[by_key[1:][key[by_key[1:]] == key[by_key[:-1]]]] = True  # all but the first of each run
    row, ids = row[~again], ids[~again]
    count = np.bincount(row, minlength=r)
    pos = np.arange(len(row)) - (np.cumsum(count) - count)[row]  # position within the visit
    keep = pos < max_codes
    lengths = np.minimum(count, max_codes)
    out = np.full((r, max(1, int(lengths.max(initial=0)))), PAD, dtype=np.int64)
    out[row[keep], pos[keep]] = ids[keep]
    return out, lengths, unknown, written, count - lengths


@dataclass
class TableCodes:
    """Per-visit encodings of one `VisitTable` (R rows); rows are gathered into batches by `batch`.

    ids / lengths / unknown hold one array per kind, each with one extra all-padding row at index R
    (what empty visit slots gather)."""

    encoder: Encoder
    starts: np.ndarray  # int64 [R] first row of each row's patient
    ids: list[np.ndarray]  # per kind int64 [R + 1, W_kind]
    lengths: list[np.ndarray]  # per kind int64 [R + 1]
    unknown: list[np.ndarray]  # per kind int64 [R + 1]
    written: np.ndarray  # int64 [R] diagnoses + procedures as written (`runtime.size_order`'s cost)
    profile: np.ndarray  # int64 [R, F]
    written_meds: np.ndarray  # int64 [R] medications as written
    over: np.ndarray  # int64 [R] diagnoses + procedures beyond `max_codes` (per kind), never read
    over_meds: np.ndarray  # int64 [R] medications beyond `max_codes`

    def kept(self, ends: np.ndarray) -> np.ndarray:
        """int64 [N] visits kept for targets whose current visit is row `ends`."""
        return np.minimum(ends - self.starts[ends] + 1, self.encoder.max_visits)

    def size_order(self, ends: np.ndarray) -> np.ndarray:
        """Targets sorted by (kept visits, diagnoses + procedures written), stable: `runtime.size_order`."""
        kept = self.kept(ends)
        total = np.concatenate([[0], np.cumsum(self.written)])
        return np.lexsort((total[ends + 1] - total[ends + 1 - kept], kept))

    def read_counts(self, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(int64 [N] codes as written, int64 [N] codes beyond `max_codes`) in what the model reads for
        targets ending at rows `ends`: the diagnoses and procedures of the kept visits and the
        medications of all of them but the current one (the scope of `Batch.unknown`)."""
        first = ends + 1 - self.kept(ends)
        out = []
        for both, meds in ((self.written, self.written_meds), (self.over, self.over_meds)):
            a, m = np.concatenate([[0], np.cumsum(both)]), np.concatenate([[0], np.cumsum(meds)])
            out.append(a[ends + 1] - a[first] + m[ends] - m[first])
        return out[0], out[1]

    def batch(self, ends: np.ndarray) -> Batch:
        """The `Batch` of `Encoder.encode` for the histories ending at rows `ends` (int64 [B])."""
        kept = self.kept(ends)
        k = int(kept.max())
        r = len(self.starts)
        slot = np.arange(k)
        real = slot[None, :] >= (k - kept)[:, None]  # [B, K] right-aligned
        rows = np.where(real, ends[:, None] - (k - 1 - slot)[None, :], r)  # [B, K], r = the padding row
        # Medications shift by one visit: a slot sees the previous kept visit's, the oldest kept none.
        prev = np.where(real[:, :-1] & real[:, 1:], rows[:, :-1], r)
        med_rows = np.concatenate([np.full((len(ends), 1), r), prev], axis=1)
        out = []
        for kind, source in enumerate((rows, rows, med_rows)):
            width = max(1, int(self.lengths[kind][source].max()))
            out.append(self.ids[kind][source][:, :, :width])  # [B, K] -> [B, K, W]
        unknown = (self.unknown[0][rows] + self.unknown[1][rows] + self.unknown[2][med_rows]).sum(1)
        target_width = max(1, int(self.lengths[2][ends].max()))
        return Batch(diagnoses=out[0], procedures=out[1], medications=out[2], profile=self.profile[ends],
                     visit_mask=real.astype(np.int64), target_medications=self.ids[2][ends][:, :target_width],
                     unknown=unknown.astype(np.int64))


def encode_table(encoder: Encoder, table: VisitTable) -> TableCodes:
    """Encode every visit of `table` once (ids per kind, profile ids per row)."""
    r = len(table.visit_ids)
    ids, lengths, unknown, written, over = [], [], [], [], []
    for kind, column in zip(KINDS, CODE_COLUMNS):
        a, n, u, w, o = _kind_ids(encoder._index[kind], table.codes[column], encoder.max_codes)
        ids.append(np.vstack([a, np.full((1, a.shape[1]), PAD, dtype=np.int64)]))
        lengths.append(np.append(n, 0))
        unknown.append(np.append(u, 0))
        written.append(w)
        over.append(o)
    fields = encoder.profile_fields
    profile = np.full((r, max(len(fields), 1)), PAD, dtype=np.int64)
    for j, f in enumerate(fields):  # a field the file lacks reads as "" for every row, as `profile_ids`
        values = table.profile.get(f, repeat("", r))
        profile[:, j] = np.fromiter(map(encoder._profile_index[f].get, values, repeat(encoder._profile_offset[f])),
                                    dtype=np.int64, count=r)
    starts = np.repeat(table.starts[:-1], np.diff(table.starts))
    return TableCodes(encoder, starts, ids, lengths, unknown, written[0] + written[1], profile, written[2],
                      over[0] + over[1], over[2])
