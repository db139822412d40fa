"""The recommendations (predictions) file: one row per scored visit, any system can write it.

    patient_id,visit_id,medications,scores
    p1,v3,A02B;B01A;C07A,A02B:0.9731;B01A:0.8120;C07A:0.5004;N02B:0.1203

- `medications`: the recommended set, codes joined by ';' (empty = nothing recommended).
- `scores` (optional column): `code:prob` joined by ';', prob in [0, 1]. `write_predictions`
  writes every medication whose probability rounds to at least 0.0001 at 4 decimals, highest
  first; a code absent from `scores` reads as probability 0. A file without the column can be
  scored on everything but PRAUC.

stdlib + numpy only: the torch-free `predict` runtime imports this module.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leader_edge.csv_checks import SEP, check_header, check_visit_ids, iter_csv_rows, parse_code_list
from leader_edge.errors import DataError

PREDICTION_COLUMNS = ("patient_id", "visit_id", "medications", "scores")
REQUIRED_COLUMNS = PREDICTION_COLUMNS[:3]
# `scores` is read; the columns `leader-edge predict` adds for people (DDI warnings, unknown-code
# counts) are accepted and ignored, so its output scores as is.
OPTIONAL_COLUMNS = ("scores", "ddi_warnings", "unknown_codes")
DECIMALS = 4


@dataclass(frozen=True, slots=True)
class Prediction:
    """One visit's recommendation; `scores` is None when the file has no scores column.

    `line` is the physical line in the file it was read from (0 when built in code)."""

    patient_id: str
    visit_id: str
    medications: tuple[str, ...]
    scores: dict[str, float] | None = None
    line: int = 0


def write_predictions(
    path: str | Path,
    patient_ids: list[str],
    visit_ids: list[str],
    y_prob: np.ndarray,
    med_codes: list[str],
    threshold: float,
) -> None:
    """Write recommendations atomically (temp file beside `path`, then rename).

    Args:
        patient_ids, visit_ids: N ids, row order of `y_prob`.
        y_prob: [N, M] probabilities over `med_codes`.
        med_codes: M medication codes (the model's label space, `ds.vocab("medication")`).
        threshold: a medication is recommended when its probability >= threshold.
    """
    y_prob = np.asarray(y_prob, dtype=np.float64)
    n = len(visit_ids)
    if y_prob.shape != (n, len(med_codes)) or len(patient_ids) != n:
        raise ValueError(
            f"y_prob has shape {y_prob.shape}, expected ({n} visits, {len(med_codes)} medications) "
            f"with {len(patient_ids)} patient ids"
        )
    if not np.isfinite(y_prob).all() or (y_prob < 0).any() or (y_prob > 1).any():
        raise ValueError("y_prob must hold probabilities in [0, 1]; apply a sigmoid to logits first")
    if len(set(visit_ids)) != n:
        raise ValueError("visit_ids must be unique: one row per visit")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(PREDICTION_COLUMNS)
            rounded = np.round(y_prob, DECIMALS)
            order = np.argsort(-y_prob, axis=1, kind="stable")  # [N, M] highest first
            for i in range(n):
                row = order[i]
                kept = row[rounded[i, row] > 0]  # numpy filters; Python only formats the kept codes
                meds = SEP.join(med_codes[j] for j in row[y_prob[i, row] >= threshold])
                scores = SEP.join(f"{med_codes[j]}:{rounded[i, j]:.{DECIMALS}f}" for j in kept)
                w.writerow([patient_ids[i], visit_ids[i], meds, scores])
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parse_scores(text: str, *, path: Path, line: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in parse_code_list(text, path=path, line=line, column="scores"):
        code, colon, prob_text = item.rpartition(":")
        if not colon or not code:
            raise DataError(path, f"score {item!r} is not code:probability", line=line, column="scores",
                            fix="write scores as CODE:PROB joined by ';', e.g. A02B:0.97;B01A:0.12")
        try:
            prob = float(prob_text)
        except ValueError:
            raise DataError(path, f"probability {prob_text!r} of {code!r} is not a number", line=line, column="scores",
                            fix="write a decimal number between 0 and 1") from None
        if not (math.isfinite(prob) and 0.0 <= prob <= 1.0):
            raise DataError(path, f"probability {prob_text} of {code!r} is outside [0, 1]", line=line, column="scores",
                            fix="write probabilities, not logits or percentages (apply a sigmoid / divide by 100)")
        if code in out:
            raise DataError(path, f"medication {code!r} scored twice", line=line, column="scores", fix="keep one score per medication")
        out[code] = prob
    return out


def read_predictions(path: str | Path) -> list[Prediction]:
    """Read and validate a recommendations file.

    Raises:
        DataError: missing file, wrong header, empty ids, duplicate visit ids, stray separators
            in `medications` or `scores`, a score that is not `code:prob` with prob in [0, 1].
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found", fix="pass a recommendations CSV (patient_id,visit_id,medications[,scores])")
    rows = iter_csv_rows(path)
    _, head = next(rows)
    header = head["__header__"]
    check_header(header, REQUIRED_COLUMNS, path, optional=OPTIONAL_COLUMNS)
    has_scores = "scores" in header
    seen: dict[str, int] = {}
    out: list[Prediction] = []
    for line, row in rows:
        pid, vid = check_visit_ids(row, seen, path=path, line=line)
        out.append(Prediction(
            patient_id=pid,
            visit_id=vid,
            medications=parse_code_list(row["medications"], path=path, line=line, column="medications"),
            scores=_parse_scores(row["scores"], path=path, line=line) if has_scores else None,
            line=line,
        ))
    return out


def prediction_matrices(
    predictions: list[Prediction], med_codes: list[str]
) -> tuple[np.ndarray, np.ndarray | None]:
    """y_pred [N, M] bool and y_prob [N, M] float (None without scores) over `med_codes`.

    Raises:
        ValueError: a recommended or scored code is not in `med_codes` (dropping it would hide a
            false positive; build `med_codes` with `predicted_codes`).
    """
    index = {c: j for j, c in enumerate(med_codes)}
    missing = predicted_codes(predictions) - index.keys()
    if missing:
        raise ValueError(f"{len(missing)} predicted code(s) outside the medication vocabulary, e.g. {sorted(missing)[:3]}; "
                         "include predicted_codes(predictions) in med_codes")
    n, m = len(predictions), len(med_codes)
    y_pred = np.zeros((n, m), dtype=bool)
    has_scores = bool(predictions) and predictions[0].scores is not None
    y_prob = np.zeros((n, m), dtype=np.float64) if has_scores else None
    for i, p in enumerate(predictions):
        y_pred[i, [index[c] for c in p.medications]] = True
        if y_prob is not None and p.scores:
            y_prob[i, [index[c] for c in p.scores]] = list(p.scores.values())
    return y_pred, y_prob


def predicted_codes(predictions: list[Prediction]) -> set[str]:
    """Every code recommended or scored in `predictions`."""
    return {c for p in predictions for c in (*p.medications, *(p.scores or ()))}
