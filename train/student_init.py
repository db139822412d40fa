"""Where the student starts: co-occurrence log-odds for the wide path, teacher name embeddings for codes.

    wide = cooc_log_odds(train_batch, labels, n_codes, smoothing=2.0)            # [n_codes, n_meds]
    names = teacher_name_vectors(ds, encoder, run_dir, method="input", layers=4)  # [n_codes, hidden]
    near = name_neighbour_prior(train_batch, labels, names, kinds, k=10)         # [n_codes, n_meds]

Only the distilled student uses `names` (the teacher's knowledge): its code embeddings start from
their PCA (`code_embeddings.pca_init`) and its wide table may be smoothed toward `near`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from leader_edge.data.dataset import Dataset
from leader_edge.bedside.encoding import KINDS, Batch, Encoder
from leader_edge.errors import StateError
from leader_edge.train.code_embeddings import CODE_EMBEDDINGS, cached_name_vectors

log = logging.getLogger(__name__)

PARAM_BUDGET = 1_000_000  # issue 4: <= 1M parameters used at inference
LOW_RANK = 64  # wide rank when the full table does not fit: MIMIC-III 3,540 codes x 64 + 64 x 150 = 236k


def current_codes(batch: Batch) -> np.ndarray:
    """int64 [N, L]: the ids the wide path sees - the current visit's diagnoses, procedures and
    the previous visit's medications (slot K-1), -1 padded."""
    return np.concatenate([batch.diagnoses[:, -1], batch.procedures[:, -1], batch.medications[:, -1]], axis=1)


def cooc_counts(batch: Batch, labels: np.ndarray, n_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """(co [n_codes, n_meds], count [n_codes]): training samples with the code (and the medication)."""
    codes = current_codes(batch)
    n, m = labels.shape
    x = np.zeros((n, n_codes), dtype=np.float32)
    rows = np.repeat(np.arange(n), codes.shape[1])
    keep = codes.reshape(-1) >= 0
    x[rows[keep], codes.reshape(-1)[keep]] = 1.0
    return x.T @ labels, x.sum(0)


def cooc_log_odds(batch: Batch, labels: np.ndarray, n_codes: int, smoothing: float,
                  neighbour_prior: np.ndarray | None = None) -> np.ndarray:
    """float32 [n_codes, n_meds]: logit P(med | code) - logit P(med) on the training samples.

    P(med | code) = (co + a * q) / (count + a): a code seen a few times is pulled toward q, the
    global prior (lift 0, as in the frequency baseline) or, when given, `neighbour_prior` [n_codes,
    n_meds] (what codes with similar names get). Unseen codes get q's lift.
    """
    co, count = cooc_counts(batch, labels, n_codes)
    prior = labels.mean(0).clip(1e-4, 1 - 1e-4)
    q = prior if neighbour_prior is None else neighbour_prior
    p = ((co + smoothing * q) / (count[:, None] + smoothing)).clip(1e-4, 1 - 1e-4)
    return (np.log(p / (1 - p)) - np.log(prior / (1 - prior))).astype(np.float32)


def name_neighbour_prior(batch: Batch, labels: np.ndarray, vectors: np.ndarray, kinds: np.ndarray, k: int) -> np.ndarray:
    """float32 [n_codes, n_meds]: P(med) pooled over the `k` training codes whose teacher name
    embeddings are most similar (cosine after centring), same kind, the code itself excluded.

    This is the teacher's knowledge in the wide path: a tail code seen ~5 times (or never) borrows
    the medication profile of codes the LLM reads as related ("Pneumococcal pneumonia" ->
    "Pneumonia, organism NOS").
    """
    n_codes = len(vectors)
    co, count = cooc_counts(batch, labels, n_codes)
    seen = count > 0
    v = vectors - vectors[seen].mean(0)
    v = v / np.linalg.norm(v, axis=1, keepdims=True).clip(1e-8)
    sim = v @ v.T  # [n_codes, n_codes]
    sim[~seen[None, :].repeat(n_codes, 0) | (kinds[:, None] != kinds[None, :])] = -np.inf
    np.fill_diagonal(sim, -np.inf)
    top = np.argsort(-sim, axis=1)[:, :k]  # [n_codes, k]
    valid = np.take_along_axis(sim, top, 1) > -np.inf
    pooled_co = (co[top] * valid[..., None]).sum(1)
    pooled_n = (count[top] * valid).sum(1)[:, None]
    prior = labels.mean(0)
    return np.where(pooled_n > 0, pooled_co / np.maximum(pooled_n, 1), prior).astype(np.float32)


def frequency_prior(ds: Dataset, samples: dict[str, list], encoder: Encoder, *, seed: int,
                    rule: str | None = None, out_of_fold: bool = True) -> tuple[dict, np.ndarray | None]:
    """The counting prior of a student with `prior="frequency"`.

    The frequency baseline is fitted on the training samples with its rule and smoothing chosen on
    validation (as `evaluate --baseline` does) and laid out over the encoder's shared code ids.

    Args:
        rule: None (the validation-chosen rule), one of `PRIOR_RULES`, or "stack" (all four).

    Returns:
        (tables, train_logits): tables = {"rule", "chosen", "smoothing", "table" [n_codes, n_meds],
        "weight" [n_codes] (specificity weights, 0 = unseen), "global" [n_meds], "global_weight"}
        for `Student.set_prior`; train_logits float32 [N train, n_meds, R]: each training sample's
        rule logits (R = 4 for "stack", else 1) from a baseline fitted WITHOUT that patient
        (`baselines.out_of_fold_proba`), so the student learns the baseline's held-out error
        instead of trusting in-sample counts that already contain the target.
    """
    from leader_edge.evaluation.baselines import PRIOR, fit_frequency_baseline, out_of_fold_proba
    from leader_edge.train.student import PRIOR_RULES

    base, threshold, _ = fit_frequency_baseline(ds, samples)
    chosen = base.rule
    rule = rule or chosen
    if base.med_codes != list(encoder.codes["medication"]):
        raise ValueError("the baseline's medication order differs from the encoder's; both must use ds.vocab('medication')")
    index = {f: i for i, f in enumerate(base.features)}
    prefix = {"diagnosis": "d:", "procedure": "p:", "medication": "m:"}  # baselines.visit_features
    rows = np.array([index.get(prefix[k] + c, -1) for k in KINDS for c in encoder.codes[k]])
    seen = rows >= 0
    cond = base.conditional()  # [F, M]
    table = np.zeros((len(rows), cond.shape[1]), dtype=np.float32)
    table[seen] = cond[rows[seen]]
    g = index[PRIOR]
    spec = np.log1p(base.n_visits / np.maximum(base.count, 1))  # [F] > 0, as FrequencyBaseline.predict_proba
    weight = np.where(seen, spec[np.maximum(rows, 0)], 0.0)
    rules = PRIOR_RULES if rule == "stack" else (rule,)
    tables = {"rule": rule, "chosen": chosen, "smoothing": base.smoothing, "threshold": threshold, "table": table,
              "weight": weight.astype(np.float32), "global": cond[g].astype(np.float32), "global_weight": float(spec[g])}
    log.info("counting prior: rule %s (validation chose %s), a=%s; %d of %d codes seen", rule, chosen, base.smoothing,
             int(seen.sum()), len(rows))
    if not out_of_fold:
        return tables, None
    oof = np.stack([out_of_fold_proba(ds, samples["train"], rule=r, smoothing=base.smoothing, seed=seed) for r in rules], -1)
    oof = np.clip(oof, 1e-4, 1 - 1e-4)
    return tables, np.log(oof / (1 - oof)).astype(np.float32)


def fit_prior_mix(train_logits: np.ndarray, labels: np.ndarray, chosen: int, *, l2: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """(mix [R], bias [n_meds]): logistic stacking of the rules' out-of-fold logits [N, M, R] -
    one weight per rule shared by every medication (per-medication weights overfit: validation
    PRAUC 0.586 on default synth) and a per-medication bias; starts at the validation-chosen rule.
    Deterministic (L-BFGS on a convex loss)."""
    import torch

    x = torch.from_numpy(train_logits).double()
    y = torch.from_numpy(labels).double()
    mix = torch.zeros(x.shape[-1], dtype=torch.float64)
    mix[chosen] = 1.0
    mix.requires_grad_(True)
    bias = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([mix, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits((x * mix).sum(-1) + bias, y) + l2 * (mix ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return mix.detach().numpy().astype(np.float32), bias.detach().numpy().astype(np.float32)


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
        raise StateError(f"{path} names no teacher backbone; run the teacher stage, set DistillConfig.teacher_spec, "
                           "or use code_init='none'") from None


def teacher_name_vectors(ds: Dataset, encoder: Encoder, run_dir: Path, *, method: str, layers: int,
                         spec: str | None = None) -> np.ndarray:
    """float32 [n_codes, teacher hidden]: the teacher's name embedding of every shared code id
    (cached in RUN/teacher/code-embeddings.safetensors)."""
    spec = spec or teacher_spec(run_dir)
    keys = [f"{k}:{c}" for k in KINDS for c in encoder.codes[k]]
    names = [ds.name(k, c) for k in KINDS for c in encoder.codes[k]]
    (run_dir / "teacher").mkdir(parents=True, exist_ok=True)
    return cached_name_vectors(run_dir / "teacher" / CODE_EMBEDDINGS, keys, names, spec, method=method, layers=layers)
