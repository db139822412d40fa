"""Where the student starts: co-occurrence log-odds for the wide path, teacher name embeddings for codes.

    wide = cooc_log_odds(train_batch, labels, n_codes, smoothing=2.0)      # [n_codes, n_meds]
    emb = teacher_code_init(ds, encoder, run_dir, train_batch, config)     # [n_codes, dim]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from leader_edge.dataset import Dataset
from leader_edge.encoding import KINDS, Batch, Encoder
from leader_edge.train.code_embeddings import CODE_EMBEDDINGS, cached_name_vectors, pca_init

log = logging.getLogger(__name__)

PARAM_BUDGET = 1_000_000  # issue 4: <= 1M parameters used at inference
LOW_RANK = 64  # wide rank when the full table does not fit: MIMIC-III 3,540 codes x 64 + 64 x 150 = 236k


def current_codes(batch: Batch) -> np.ndarray:
    """int64 [N, L]: the ids the wide path sees - the current visit's diagnoses, procedures and
    the previous visit's medications (slot K-1), -1 padded."""
    return np.concatenate([batch.diagnoses[:, -1], batch.procedures[:, -1], batch.medications[:, -1]], axis=1)


def cooc_log_odds(batch: Batch, labels: np.ndarray, n_codes: int, smoothing: float) -> np.ndarray:
    """float32 [n_codes, n_meds]: logit P(med | code) - logit P(med) on the training samples.

    P(med | code) = (co + a * prior) / (count + a): a code seen a few times is pulled toward the
    prior (lift 0), as in the frequency baseline. Unseen codes get 0.
    """
    codes = current_codes(batch)
    n, m = labels.shape
    x = np.zeros((n, n_codes), dtype=np.float32)
    rows = np.repeat(np.arange(n), codes.shape[1])
    keep = codes.reshape(-1) >= 0
    x[rows[keep], codes.reshape(-1)[keep]] = 1.0
    co = x.T @ labels  # [n_codes, n_meds]
    count = x.sum(0)[:, None]
    prior = labels.mean(0).clip(1e-4, 1 - 1e-4)
    p = ((co + smoothing * prior) / (count + smoothing)).clip(1e-4, 1 - 1e-4)
    return (np.log(p / (1 - p)) - np.log(prior / (1 - prior))).astype(np.float32)


def low_rank(table: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """([n_codes, rank], [rank, n_meds]) whose product is the best rank-`rank` approximation of `table`."""
    u, s, vt = np.linalg.svd(table, full_matrices=False)
    root = np.sqrt(s[:rank])
    return (u[:, :rank] * root).astype(np.float32), (root[:, None] * vt[:rank]).astype(np.float32)


def wide_rank(n_codes: int, n_meds: int, other_params: int) -> int:
    """0 (full table) when n_codes * n_meds fits the budget beside the deep model, else `LOW_RANK`."""
    return 0 if other_params + n_codes * n_meds <= PARAM_BUDGET else LOW_RANK


def train_code_rows(batch: Batch, n_codes: int) -> np.ndarray:
    """bool [n_codes]: codes that occur in the training samples (inputs or targets)."""
    seen = np.zeros(n_codes, dtype=bool)
    for a in (batch.diagnoses, batch.procedures, batch.medications, batch.target_medications):
        ids = a[a >= 0]
        seen[ids] = True
    return seen


def teacher_spec(run_dir: Path) -> str:
    """The --teacher value recorded in RUN/teacher/config.json."""
    path = run_dir / "teacher" / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))["teacher"]["teacher"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        raise RuntimeError(f"{path} names no teacher backbone; run the teacher stage, set DistillConfig.teacher_spec, "
                           "or use code_init='none'") from None


def teacher_code_init(ds: Dataset, encoder: Encoder, run_dir: Path, train: Batch, *, method: str, layers: int,
                      dim: int, scale: float, spec: str | None = None) -> np.ndarray:
    """float32 [n_codes, dim]: the teacher's name embedding of every shared code id, PCA-reduced
    on the training codes (cached full-width in RUN/teacher/code-embeddings.safetensors)."""
    spec = spec or teacher_spec(run_dir)
    keys = [f"{k}:{c}" for k in KINDS for c in encoder.codes[k]]
    names = [ds.name(k, c) for k in KINDS for c in encoder.codes[k]]
    (run_dir / "teacher").mkdir(parents=True, exist_ok=True)
    vectors = cached_name_vectors(run_dir / "teacher" / CODE_EMBEDDINGS, keys, names, spec, method=method, layers=layers)
    return pca_init(vectors, train_code_rows(train, encoder.n_codes), dim, scale)
