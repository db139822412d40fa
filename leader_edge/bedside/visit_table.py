"""A chunk of validated visits as columns: what the visits reader yields and the encoder reads.

The reader (`leader_edge.bedside.visit_stream`) builds `VisitTable`s of whole patients, one list per CSV
column; `Encoder.encode_table` encodes their code columns in whole-chunk numpy passes, and
`dataset.read_visits` turns their rows into `Visit`s for training.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np


@dataclass
class VisitTable:
    """R visits of P whole patients, in file order; each patient's visits contiguous, oldest first.

    Attributes:
        patient_ids: P ids.
        starts: int64 [P + 1] row offsets; patient p owns rows starts[p]:starts[p + 1].
        visit_ids: R ids. lines: int64 [R] file line of each row.
        codes: code column ("diagnoses", ...) -> R texts, canonical `a;b;c` ("" = no codes).
        profile: field (no prefix) -> R stripped values, for the profile columns of the file.
        times: R visit times (None in a table built without them).
    """

    patient_ids: list[str]
    starts: np.ndarray
    visit_ids: list[str]
    lines: np.ndarray
    codes: dict[str, list[str]]
    profile: dict[str, list[str]]
    times: list[datetime] | None = None

    def __len__(self) -> int:
        """Patients in the table."""
        return len(self.patient_ids)

    def row_patients(self) -> list[str]:
        """R patient ids, one per row."""
        return [self.patient_ids[p] for p in np.repeat(np.arange(len(self)), np.diff(self.starts)).tolist()]
