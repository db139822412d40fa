"""Visits -> padded int64 arrays for the student: the one encoder of training, export and `predict`.

numpy only (no torch, no Dataset): the bedside runtime imports this module. Two doors, one encoder:
- `Encoder.encode(patients) -> Batch`: patients as sequences of visits; anything with `diagnoses`,
  `procedures`, `medications` (code sequences) and `profile` (a mapping or `(field, value)` pairs)
  attributes works - `dataset.Visit` and `RawVisit`. Training batches and the export checks use it.
- `Encoder.encode_table(table)`: a reader's `VisitTable` (codes as `a;b;c` texts), for `predict`.
Both flatten the visits into one token list per kind and encode every visit once in whole-array
numpy passes (`_kind_codes`: a dict lookup through `map`, a stable sort for the repeats, a scatter);
`EncodedVisits.batch(ends)` then gathers any targets with their histories. Per-patient Python was
the largest share of `predict` (encoding 2.5 s of 5.5 s per 32k patients).

Conventions (the student, its ONNX export and `predict` all rely on them):
- One shared code index: diagnoses take ids `[0, n_diag)`, procedures `[n_diag, n_diag + n_proc)`,
  medications the rest, so one embedding table serves all three. Padding is -1 (what
  `leader_edge.kernels.embedding_bag` expects). Codes outside the vocabulary are dropped and counted.
- Visits are RIGHT-aligned: slot `K - 1` is always the current (target) visit, slot `K - 2` the one
  before, and so on; empty history slots have `visit_mask == 0`. So "current visit" and "how far back"
  are fixed positions, which needs no data-dependent indexing in the model.
- Only the last `max_visits` visits are kept (LEADER-NOTES: keep the current visit, drop the OLDEST).
- Medications are shifted by one visit: slot t holds the medications of the visit before it; the
  oldest kept visit's slot is empty (the model puts the profile vector there), and so is the current
  visit's own medication list never seen as input.
- Per visit and kind, duplicate codes are dropped and at most `max_codes` codes are kept, the FIRST
  ones in file order (MIMIC lists diagnoses by priority, `seq_num`, so the first are the main ones).
- Profile: one id per field in one shared index, `field offset + value index`, where value index 0
  means "unknown / unseen value". Taken from the current visit.
- Arrays are padded to the longest row in the batch (never beyond the caps), so batch 1 costs what it
  holds: padding every visit to 100 codes cost the released student 7x (LEADER-NOTES).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import attrgetter
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from leader_edge.bedside.visit_table import VisitTable

KINDS = ("diagnosis", "procedure", "medication")
CODE_COLUMNS = ("diagnoses", "procedures", "medications")  # the visit field (and CSV column) of each kind
PAD = -1
# Inputs of the student's tensor path, in the order of `Batch.inputs()` (ONNX input names too).
INPUT_NAMES = ("diagnoses", "procedures", "medications", "profile", "visit_mask")


class RawVisit(NamedTuple):
    """A visit as plain data, for callers without a Dataset (the `predict` runtime)."""

    diagnoses: Sequence[str]
    procedures: Sequence[str]
    medications: Sequence[str]
    profile: Mapping[str, str] | Sequence[tuple[str, str]] = ()


@dataclass
class Batch:
    """Encoded patients. B patients, K visit slots, L codes per visit (each <= its cap), F fields.

    Attributes:
        diagnoses: int64 [B, K, Ld] shared code ids, -1 padded.
        procedures: int64 [B, K, Lp].
        medications: int64 [B, K, Lm], medications of the PREVIOUS visit per slot.
        profile: int64 [B, F] profile ids (shared profile index); F >= 1 (a -1 column if no fields).
        visit_mask: int64 [B, K], 1 for a real visit; slot K-1 (the current visit) is always 1.
        target_medications: int64 [B, Lt] ids of the current visit's own medications (training
            only: labels, and the InfoNCE side of the profile alignment). Not a model input.
        unknown: int64 [B] codes dropped as unknown (all kinds, all kept visits).
    """

    diagnoses: np.ndarray
    procedures: np.ndarray
    medications: np.ndarray
    profile: np.ndarray
    visit_mask: np.ndarray
    target_medications: np.ndarray
    unknown: np.ndarray

    def inputs(self) -> dict[str, np.ndarray]:
        """The model inputs by name (see `INPUT_NAMES`)."""
        return {name: getattr(self, name) for name in INPUT_NAMES}

    def __len__(self) -> int:
        return int(self.profile.shape[0])


def _profile_items(profile: Any) -> dict[str, str]:
    if isinstance(profile, Mapping):
        return {str(k): str(v) for k, v in profile.items()}
    return {str(k): str(v) for k, v in profile}


@dataclass
class Encoder:
    """Vocabularies and caps; `encode` turns patients' visits into a `Batch`.

    Args:
        codes: kind -> codes in index order (use `Dataset.vocab(kind)`; medication order is the
            label order of every model).
        profile_values: field -> known values (index 1..; 0 is unknown). Field order is input order.
        max_visits: visits kept per patient, the current one included. The preprocessed MIMIC-III
            cohort averages ~2.4 visits per patient (15,000 / 6,350) and synth ~1.4, so 8 keeps the
            whole history of nearly everyone while bounding the cost of outliers.
        max_codes: codes kept per visit and kind. MIMIC-III lists at most 39 diagnoses per admission
            and synth ~9 on average (22 at most); 32 loses only the low-priority tail of the longest visits.
    """

    codes: dict[str, list[str]]
    profile_values: dict[str, list[str]] = field(default_factory=dict)
    max_visits: int = 8
    max_codes: int = 32

    def __post_init__(self) -> None:
        missing = [k for k in KINDS if k not in self.codes]
        if missing:
            raise ValueError(f"Encoder.codes lacks kind(s) {missing}; pass a list of codes for each of {KINDS}")
        if self.max_visits < 1 or self.max_codes < 1:
            raise ValueError(f"max_visits={self.max_visits} and max_codes={self.max_codes} must both be >= 1")
        self._index: dict[str, dict[str, int]] = {}
        offset = 0
        for kind in KINDS:
            self._index[kind] = {c: offset + i for i, c in enumerate(self.codes[kind])}
            if len(self._index[kind]) != len(self.codes[kind]):
                raise ValueError(f"{kind} vocabulary has duplicate codes; pass Dataset.vocab({kind!r})")
            offset += len(self.codes[kind])
        self._profile_offset: dict[str, int] = {}
        self._profile_index: dict[str, dict[str, int]] = {}
        offset = 0
        for name, values in self.profile_values.items():
            self._profile_offset[name] = offset
            self._profile_index[name] = {v: offset + 1 + i for i, v in enumerate(values)}
            offset += 1 + len(values)

    # -- sizes ------------------------------------------------------------------------------------

    @property
    def n_codes(self) -> int:
        """Rows of the shared code embedding table."""
        return sum(len(self.codes[k]) for k in KINDS)

    @property
    def n_meds(self) -> int:
        return len(self.codes["medication"])

    @property
    def med_offset(self) -> int:
        """Shared id of the first medication: label j is shared id `med_offset + j`."""
        return len(self.codes["diagnosis"]) + len(self.codes["procedure"])

    @property
    def profile_fields(self) -> list[str]:
        return list(self.profile_values)

    @property
    def n_profile_ids(self) -> int:
        """Rows of the profile embedding table (one "unknown" row per field)."""
        return sum(1 + len(v) for v in self.profile_values.values())

    def code_groups(self) -> np.ndarray:
        """int64 [n_codes]: each shared id's group, a code-system parent shared by related codes.

        Diagnosis: the ICD-9 category (first 3 characters, 4 for E codes: 428.x heart failure);
        procedure: the first 2 characters (ICD-9-PCS-style chapter); medication: the first 3
        (ATC level 2 of an ATC-3 class). A rare code seen 5 times in training borrows its group's
        embedding, which the group's frequent codes have trained.
        """
        prefix = {"diagnosis": lambda c: c[:4] if c.startswith("E") else c[:3],
                  "procedure": lambda c: c[:2], "medication": lambda c: c[:3]}
        index: dict[tuple[str, str], int] = {}
        return np.array([index.setdefault((k, prefix[k](c)), len(index)) for k in KINDS for c in self.codes[k]],
                        dtype=np.int64)

    # -- construction and persistence -----------------------------------------------------------

    @classmethod
    def from_visits(cls, vocab: dict[str, list[str]], visits: Sequence[Any], **caps: int) -> "Encoder":
        """Vocabularies from `vocab` (kind -> codes), profile values from these (training) visits."""
        values: dict[str, set[str]] = {}
        for v in visits:
            for k, val in _profile_items(v.profile).items():
                values.setdefault(k, set()).add(val)
        return cls({k: list(vocab[k]) for k in KINDS}, {k: sorted(s) for k, s in values.items()}, **caps)

    def to_json(self) -> dict:
        return {
            "codes": self.codes,
            "profile_values": self.profile_values,
            "max_visits": self.max_visits,
            "max_codes": self.max_codes,
        }

    @classmethod
    def from_json(cls, data: dict | str) -> "Encoder":
        d = json.loads(data) if isinstance(data, str) else data
        return cls(
            {k: list(d["codes"][k]) for k in KINDS},
            {k: list(v) for k, v in d.get("profile_values", {}).items()},
            max_visits=int(d["max_visits"]),
            max_codes=int(d["max_codes"]),
        )


    # -- encoding ---------------------------------------------------------------------------------

    def profile_ids(self, profile: Any) -> list[int]:
        """One id per field; missing fields and unseen values get the field's unknown id."""
        items = _profile_items(profile)
        return [
            self._profile_index[f].get(items.get(f, ""), self._profile_offset[f])
            for f in self.profile_values
        ]

    def encode(self, patients: Sequence[Sequence[Any]]) -> Batch:
        """Encode each patient's visits (time order, last = current) into one `Batch`.

        Args:
            patients: B sequences of visits; each needs at least one visit.

        Returns:
            A Batch with K = min(max_visits, longest patient) right-aligned visit slots.
        """
        if not patients:
            raise ValueError("encode() got no patients; pass at least one list of visits")
        kept = [list(p)[-self.max_visits:] for p in patients]
        if not all(kept):
            raise ValueError("a patient has no visits; every patient needs at least the current visit")
        visits = self.encode_visits(kept)
        return visits.batch(visits.last_rows())

    def encode_visits(self, patients: Sequence[Sequence[Any]]) -> EncodedVisits:
        """Every visit of these patients encoded once (R rows, patients one after the other)."""
        visits = [v for p in patients for v in p]
        r = len(visits)
        kinds = []
        for kind, column in zip(KINDS, CODE_COLUMNS):
            lists = list(map(attrgetter(column), visits))
            lengths = np.fromiter(map(len, lists), dtype=np.int64, count=r)
            kinds.append(_kind_codes(self, kind, list(chain.from_iterable(lists)), lengths, lengths))
        profile = np.full((r, max(len(self.profile_values), 1)), PAD, dtype=np.int64)
        if self.profile_values:
            profile[:] = [self.profile_ids(v.profile) for v in visits]
        counts = np.fromiter(map(len, patients), dtype=np.int64, count=len(patients))
        return EncodedVisits(self, np.repeat(np.cumsum(counts) - counts, counts), *zip(*kinds), profile)

    def encode_table(self, table: VisitTable) -> EncodedVisits:
        """Every visit of a reader's `VisitTable` encoded once, straight from its `a;b;c` code texts."""
        r = len(table.visit_ids)
        kinds = []
        for kind, column in zip(KINDS, CODE_COLUMNS):
            texts = table.codes[column]
            per_row = np.fromiter(map(str.count, texts, repeat(";")), dtype=np.int64, count=r) + 1
            written = np.where(np.fromiter(map(bool, texts), dtype=bool, count=r), per_row, 0)
            # An empty text still splits into one "" token: counted in `per_row`, not in `written`.
            kinds.append(_kind_codes(self, kind, ";".join(texts).split(";"), per_row, written))
        profile = np.full((r, max(len(self.profile_values), 1)), PAD, dtype=np.int64)
        for j, f in enumerate(self.profile_values):  # a field the file lacks reads as "" in every row
            values = table.profile.get(f, repeat("", r))
            profile[:, j] = np.fromiter(map(self._profile_index[f].get, values, repeat(self._profile_offset[f])),
                                        dtype=np.int64, count=r)
        return EncodedVisits(self, np.repeat(table.starts[:-1], np.diff(table.starts)), *zip(*kinds), profile)

    def multi_hot(self, patients: Sequence[Sequence[Any]]) -> np.ndarray:
        """float32 [B, n_meds] labels: the current visit's medications (all of them, no cap)."""
        index = self._index["medication"]
        out = np.zeros((len(patients), self.n_meds), dtype=np.float32)
        for i, visits in enumerate(patients):
            for c in visits[-1].medications:
                j = index.get(c)
                if j is not None:
                    out[i, j - self.med_offset] = 1.0
        return out


def _kind_codes(encoder: Encoder, kind: str, tokens: list[str], per_row: np.ndarray, written: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One kind's codes of R visits, given as `tokens` (row after row, `per_row[r]` of them for row
    r, of which the `written[r]` codes as written: 0 for a placeholder "" token).

    Returns:
        (int64 [R + 1, W] known ids of each row, first occurrence first, the first `max_codes`,
        -1 padded, row R all padding; int64 [R + 1] their counts; int64 [R + 1] unknown codes;
        int64 [R] codes as written; int64 [R] distinct known codes beyond `max_codes`, never read).
    """
    r, cap = len(per_row), encoder.max_codes
    row = np.repeat(np.arange(r), per_row)
    ids = np.fromiter(map(encoder._index[kind].get, tokens, repeat(-1)), dtype=np.int64, count=len(tokens))
    real = written[row] > 0
    unknown = np.bincount(row[real & (ids < 0)], minlength=r)
    known = real & (ids >= 0)
    row, ids = row[known], ids[known]
    key = row * max(encoder.n_codes, 1) + ids
    by_key = np.argsort(key, kind="stable")  # equal keys (a code repeated in a visit) in written order
    again = np.zeros(len(key), dtype=bool)
    again[by_key[1:][key[by_key[1:]] == key[by_key[:-1]]]] = True  # all but the first of each run
    row, ids = row[~again], ids[~again]
    count = np.bincount(row, minlength=r)
    pos = np.arange(len(row)) - (np.cumsum(count) - count)[row]  # position within the visit
    keep = pos < cap
    lengths = np.minimum(count, cap)
    out = np.full((r + 1, max(1, int(lengths.max(initial=0)))), PAD, dtype=np.int64)
    out[row[keep], pos[keep]] = ids[keep]
    return out, np.append(lengths, 0), np.append(unknown, 0), written, count - lengths


@dataclass
class EncodedVisits:
    """R visits encoded once; `batch(ends)` gathers any targets with their histories into a `Batch`.

    A target is a row: its visit is the current one, the rows before it of the same patient its
    history. Per kind (`KINDS` order) one array each of `ids`, `lengths`, `unknown` (with an extra
    all-padding row R, what empty visit slots gather), `written` and `over`.
    """

    encoder: Encoder
    starts: np.ndarray  # int64 [R] first row of each row's patient
    ids: tuple[np.ndarray, ...]  # int64 [R + 1, W_kind] shared ids, first `max_codes` distinct known codes
    lengths: tuple[np.ndarray, ...]  # int64 [R + 1]
    unknown: tuple[np.ndarray, ...]  # int64 [R + 1] codes outside the vocabulary
    written: tuple[np.ndarray, ...]  # int64 [R] codes as written
    over: tuple[np.ndarray, ...]  # int64 [R] distinct known codes beyond `max_codes`, never read
    profile: np.ndarray  # int64 [R, F] profile ids of each row

    def last_rows(self) -> np.ndarray:
        """int64 [P] the last row of each patient: its current visit."""
        r = len(self.starts)
        return np.flatnonzero(np.append(self.starts[1:] != self.starts[:-1], r > 0))

    def kept(self, ends: np.ndarray) -> np.ndarray:
        """int64 [N] visits kept (at most `max_visits`) for targets whose current visit is row `ends`."""
        return np.minimum(ends - self.starts[ends] + 1, self.encoder.max_visits)

    def size_order(self, ends: np.ndarray) -> np.ndarray:
        """Targets sorted by (kept visits, diagnoses + procedures written in them), stable: batches of
        neighbours pad to similar widths. Unsorted batches of 1024 synth patients pad to ~8 visits x
        32 codes and run ~4x slower (ORT fp32 531 vs 1,969 patients/s, benchmarks/results/predict.md)."""
        kept = self.kept(ends)
        total = np.concatenate([[0], np.cumsum(self.written[0] + self.written[1])])
        return np.lexsort((total[ends + 1] - total[ends + 1 - kept], kept))

    def read_counts(self, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(int64 [N] codes as written, int64 [N] codes beyond `max_codes`) in what the model reads for
        targets ending at rows `ends`: the diagnoses and procedures of the kept visits and the
        medications of all of them but the current one (the scope of `Batch.unknown`)."""
        first = ends + 1 - self.kept(ends)
        out = []
        for per_kind in (self.written, self.over):
            a = np.concatenate([[0], np.cumsum(per_kind[0] + per_kind[1])])
            m = np.concatenate([[0], np.cumsum(per_kind[2])])
            out.append(a[ends + 1] - a[first] + m[ends] - m[first])
        return out[0], out[1]

    def batch(self, ends: np.ndarray) -> Batch:
        """The `Batch` of the targets whose current visits are rows `ends` (int64 [B])."""
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
