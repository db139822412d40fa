"""Visits -> padded int64 arrays for the student: the one encoding shared by training and `predict`.

numpy only (no torch, no Dataset): the bedside runtime imports this module. Inputs are plain
sequences of visits; anything with `diagnoses`, `procedures`, `medications` (code sequences) and
`profile` (a mapping or `(field, value)` pairs) attributes works - `dataset.Visit` and `RawVisit`.

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
from typing import Any, NamedTuple

import numpy as np

KINDS = ("diagnosis", "procedure", "medication")
PAD = -1
UNKNOWN_VALUE = "<unknown>"
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


def _pad(rows: list[list[int]], width_floor: int = 1) -> np.ndarray:
    """Ragged id lists -> int64 [len(rows), max(len, width_floor)] padded with -1."""
    width = max([width_floor, *map(len, rows)])
    out = np.full((len(rows), width), PAD, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


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

    def _ids(self, kind: str, codes: Sequence[str]) -> tuple[list[int], int]:
        """Known ids of `codes` in order, de-duplicated, first `max_codes`; and the unknown count."""
        index = self._index[kind]
        out: list[int] = []
        seen: set[int] = set()
        unknown = 0
        for c in codes:
            i = index.get(c)
            if i is None:
                unknown += 1
            elif i not in seen:
                seen.add(i)
                out.append(i)
        return out[: self.max_codes], unknown

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
        if any(not p for p in kept):
            raise ValueError("a patient has no visits; every patient needs at least the current visit")
        b, k = len(kept), max(map(len, kept))
        rows: dict[str, list[list[int]]] = {kind: [[] for _ in range(b * k)] for kind in KINDS}
        visit_mask = np.zeros((b, k), dtype=np.int64)
        unknown = np.zeros(b, dtype=np.int64)
        targets: list[list[int]] = []
        # At least one column: with no profile fields the column is padding and the vector is zeros.
        profile = np.full((b, max(len(self.profile_values), 1)), PAD, dtype=np.int64)
        for i, visits in enumerate(kept):
            start = k - len(visits)  # right alignment: the current visit lands in slot k - 1
            visit_mask[i, start:] = 1
            if self.profile_values:
                profile[i] = self.profile_ids(visits[-1].profile)
            for j, v in enumerate(visits):
                slot = i * k + start + j
                for kind, codes in (("diagnosis", v.diagnoses), ("procedure", v.procedures)):
                    rows[kind][slot], n_unknown = self._ids(kind, codes)
                    unknown[i] += n_unknown
                meds, n_unknown = self._ids("medication", v.medications)
                if j + 1 < len(visits):
                    rows["medication"][slot + 1] = meds  # shift: the next visit sees these
                    unknown[i] += n_unknown
                else:
                    targets.append(meds)  # the current visit's own medications: labels only
        shape = (b, k, -1)
        return Batch(
            diagnoses=_pad(rows["diagnosis"]).reshape(shape),
            procedures=_pad(rows["procedure"]).reshape(shape),
            medications=_pad(rows["medication"]).reshape(shape),
            profile=profile,
            visit_mask=visit_mask,
            target_medications=_pad(targets),
            unknown=unknown,
        )

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
