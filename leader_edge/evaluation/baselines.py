"""The frequency baseline: co-occurrence scoring of medications given a visit's codes.

Fitted on the training split, every visit of every training patient. For each feature f of a visit
- its diagnoses (`d:`), its procedures (`p:`) and the medications of the previous visit (`m:`,
only when there is history) - it estimates

    P(med | f) = (co(f, med) + a * prior(med)) / (count(f) + a)

smoothed toward the global prior P(med) with `a` pseudo-visits, so a code seen once is not
trusted blindly. The global prior is always one more feature, so a visit with no known code gets
the most common medications. A combination rule turns the visit's feature rows into one score per
medication: "mean", "max", "noisy_or" (1 - prod(1 - P)) or "specificity" (mean weighted by
log(1 + visits / count(f)), so rare, specific codes count more than ubiquitous ones).
`fit_frequency_baseline` picks the rule, `a` and the threshold on validation Jaccard.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from leader_edge.data.dataset import Dataset, Visit
from leader_edge.data.splits import Sample
from leader_edge.errors import ConfigError
from leader_edge.evaluation.metrics import per_visit_metrics, tune_threshold

log = logging.getLogger(__name__)

RULES = ("mean", "max", "noisy_or", "specificity")
SMOOTHING_GRID = (0.5, 2.0, 8.0)
PRIOR = "prior"  # the always-present feature


def visit_features(visit: Visit, previous: Visit | None) -> list[str]:
    """Feature names of a visit: its diagnoses and procedures, the previous visit's medications."""
    feats = [PRIOR, *(f"d:{c}" for c in visit.diagnoses), *(f"p:{c}" for c in visit.procedures)]
    if previous is not None:
        feats.extend(f"m:{c}" for c in previous.medications)
    return feats


@dataclass
class FrequencyBaseline:
    """Co-occurrence statistics over the medication vocabulary `med_codes`.

    Attributes:
        med_codes: M medication codes (`ds.vocab("medication")`).
        features: F feature names, row order of `cooc` and `count`.
        cooc: [F, M] float, visits with the feature and the medication.
        count: [F] float, visits with the feature.
        n_visits: training visits.
        rule, smoothing: the combination rule and `a`.
    """

    med_codes: list[str]
    features: list[str]
    cooc: np.ndarray
    count: np.ndarray
    n_visits: int
    rule: str = "mean"
    smoothing: float = 2.0

    @classmethod
    def fit(cls, ds: Dataset, train: list[Sample], *, rule: str = "mean", smoothing: float = 2.0) -> "FrequencyBaseline":
        """Count co-occurrences over every visit of the training samples (each visit once)."""
        med_codes = ds.vocab("medication")
        rows: list[list[str]] = []
        labels: list[list[str]] = []
        seen: set[str] = set()
        for s in train:
            for t, v in enumerate(s.visits):
                if v.visit_id in seen:
                    continue
                seen.add(v.visit_id)
                rows.append(visit_features(v, s.visits[t - 1] if t else None))
                labels.append(list(v.medications))
        if not rows:
            raise ConfigError("no training visits: the training split is empty; use a dataset with more patients")
        features = sorted({f for r in rows for f in r})
        x = _multi_hot(rows, {f: i for i, f in enumerate(features)})  # [V, F]
        y = _multi_hot(labels, {c: j for j, c in enumerate(med_codes)})  # [V, M]
        cooc = np.asarray((x.T @ y).todense(), dtype=np.float64)
        count = np.asarray(x.sum(axis=0), dtype=np.float64).ravel()
        model = cls(med_codes, features, cooc, count, len(rows))
        model.set_rule(rule, smoothing)
        log.info("frequency baseline: %d training visits, %d features, %d medications", len(rows), len(features), len(med_codes))
        return model

    def set_rule(self, rule: str, smoothing: float) -> None:
        if rule not in RULES:
            raise ConfigError(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
        if smoothing < 0:
            raise ConfigError(f"smoothing must be >= 0, got {smoothing}")
        self.rule, self.smoothing = rule, smoothing

    def conditional(self) -> np.ndarray:
        """[F, M] smoothed P(med | feature)."""
        prior = self.cooc[self.features.index(PRIOR)] / self.n_visits
        return (self.cooc + self.smoothing * prior) / (self.count[:, None] + self.smoothing)

    def predict_proba(self, samples: list[Sample]) -> np.ndarray:
        """[N, M] scores in [0, 1] for each sample's target visit. Unknown codes are ignored."""
        index = {f: i for i, f in enumerate(self.features)}
        rows = [
            [f for f in visit_features(s.target, s.history[-1] if s.history else None) if f in index]
            for s in samples
        ]
        x = _multi_hot(rows, index)  # [N, F]
        cond = self.conditional()  # [F, M]
        if self.rule == "mean":
            return np.asarray(x @ cond) / np.asarray(x.sum(axis=1))
        if self.rule == "specificity":
            w = np.log1p(self.n_visits / np.maximum(self.count, 1))  # [F]
            xw = x @ sparse.diags(w)
            return np.asarray(xw @ cond) / np.asarray(xw.sum(axis=1))
        if self.rule == "noisy_or":
            # log(1 - P) summed over the visit's features; clip keeps log finite for P == 1.
            return 1.0 - np.exp(np.asarray(x @ np.log1p(-np.minimum(cond, 1 - 1e-6))))
        return np.stack([cond[[index[f] for f in r]].max(axis=0) for r in rows]) if rows else np.zeros((0, len(self.med_codes)))


def _multi_hot(rows: list[list[str]], index: dict[str, int]) -> sparse.csr_matrix:
    """[len(rows), len(index)] 0/1 CSR matrix; duplicate names in a row count once."""
    cols = [sorted({index[c] for c in r if c in index}) for r in rows]
    indptr = np.cumsum([0, *map(len, cols)])
    data = np.ones(indptr[-1], dtype=np.float64)
    indices = np.fromiter((c for r in cols for c in r), dtype=np.int64, count=indptr[-1])
    return sparse.csr_matrix((data, indices, indptr), shape=(len(rows), len(index)))


def labels(samples: list[Sample], med_codes: list[str]) -> np.ndarray:
    """[N, M] bool: the target visit's medications over `med_codes` (others are ignored)."""
    return _multi_hot([list(s.target.medications) for s in samples], {c: j for j, c in enumerate(med_codes)}).toarray() > 0


def fit_frequency_baseline(
    ds: Dataset, splits: dict[str, list[Sample]]
) -> tuple[FrequencyBaseline, float, list[dict]]:
    """Fit on splits["train"]; choose rule, smoothing and threshold on splits["val"] Jaccard.

    Returns:
        (model with the best rule set, its threshold, one dict per candidate with its validation
        rule / smoothing / threshold / jaccard).
    """
    model = FrequencyBaseline.fit(ds, splits["train"])
    val = splits["val"]
    if not val:
        raise ConfigError("the validation split is empty: the baseline's threshold cannot be tuned; use more patients")
    y_val = labels(val, model.med_codes)
    trials = []
    for rule in RULES:
        for a in SMOOTHING_GRID:
            model.set_rule(rule, a)
            prob = model.predict_proba(val)
            t = tune_threshold(y_val, prob)
            jac = float(per_visit_metrics(y_val, None, prob >= t)["jaccard"].mean())
            trials.append({"rule": rule, "smoothing": a, "threshold": t, "jaccard": round(jac, 4)})
    best = max(trials, key=lambda r: r["jaccard"])
    model.set_rule(best["rule"], best["smoothing"])
    log.info("frequency baseline: best on validation %s", best)
    return model, best["threshold"], trials


def out_of_fold_proba(
    ds: Dataset, samples: list[Sample], *, rule: str, smoothing: float, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """[N, M] baseline scores of each training sample from a model fitted WITHOUT its patient.

    A model stacked on the baseline (the teacher's `prior="frequency"`) must see on its training
    samples the baseline's held-out error, not in-sample counts that already contain the target:
    a tail code seen once would otherwise "predict" its own visit's medications perfectly. Patients
    are dealt into `folds` groups (seeded); each group is scored by a baseline fitted on the others.
    """
    if folds < 2:
        raise ConfigError(f"folds={folds} must be >= 2")
    patients = list(dict.fromkeys(s.patient_id for s in samples))
    order = np.random.default_rng(seed).permutation(len(patients))
    fold_of = {patients[i]: k % folds for k, i in enumerate(order)}
    out = np.zeros((len(samples), len(ds.vocab("medication"))), dtype=np.float64)
    for k in range(folds):
        held = [i for i, s in enumerate(samples) if fold_of[s.patient_id] == k]
        if not held:
            continue
        fit = [s for s in samples if fold_of[s.patient_id] != k]
        model = FrequencyBaseline.fit(ds, fit, rule=rule, smoothing=smoothing)
        out[held] = model.predict_proba([samples[i] for i in held])
    return out
