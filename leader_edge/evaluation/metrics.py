"""Medication-recommendation metrics: per visit, vectorised over visits, numpy only.

Every function takes multi-hot matrices `[N visits, M medications]` whose columns follow
`ds.vocab("medication")`. Conventions (the GAMENet / SafeDrug / LEADER code lineage):

- Jaccard = |pred & true| / |pred | true|; a visit where both sets are empty scores 0 (GAMENet
  counts 0 when the union is empty).
- F1 = 2 |pred & true| / (|pred| + |true|), the set F1 (= 2PR/(P+R)); 0 when both sets are empty,
  and 0 when the prediction is empty (precision undefined, counted 0 as GAMENet does).
- PRAUC = average precision of the visit's probability vector, exactly
  `sklearn.metrics.average_precision_score(y_true[i], y_prob[i])`: tied probabilities form one
  threshold (no interpolation, so the order inside a tie does not matter). A visit with no true
  medication scores 0.0 - the value sklearn returns (with a warning) - so means stay NaN-free.
- DDI rate = interacting pairs among the predicted pairs / all predicted pairs. Per visit it is
  that ratio (0 when fewer than 2 medications are predicted). Aggregated (`score`, `summarize`,
  `subsample_mean_std`) it is POOLED: sum of interacting pairs over all visits / sum of all pairs,
  as `ddi_rate_score` does in the GAMENet and SafeDrug code (it loops over every admission of
  every patient with two global counters). The pooled value is recovered from the per-visit
  arrays because a visit has n_med * (n_med - 1) / 2 pairs.
- #Med = size of the predicted set.

A metric that cannot be computed (PRAUC without probabilities, DDI rate without a DDI matrix) is
NaN per visit and NaN in every aggregate; tables print it as "-".
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

METRICS = ("jaccard", "prauc", "f1", "ddi_rate", "n_med")
# Grid for `tune_threshold`: 0.02 steps cover the 0.3 (LEADER student) and 0.5 (teacher) defaults.
THRESHOLD_GRID = tuple(round(0.02 * i, 2) for i in range(1, 50))


def _check(y_true: np.ndarray, other: np.ndarray, name: str) -> None:
    if y_true.ndim != 2 or other.shape != y_true.shape:
        raise ValueError(f"{name} has shape {other.shape}, y_true {y_true.shape}; both must be [visits, medications]")


def average_precision(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """Average precision of every row, vectorised; equal to sklearn's per row.

    Args:
        y_true: [N, M] bool.
        y_prob: [N, M] float.

    Returns:
        [N] float64; 0.0 for a row without a positive.
    """
    y_true = np.asarray(y_true, dtype=bool)
    y_prob = np.asarray(y_prob)
    _check(y_true, y_prob, "y_prob")
    n, m = y_true.shape
    if n == 0 or m == 0:
        return np.zeros(n)
    # Row-wise descending sort, then everything on the flat [N*M] index of the positives only
    # (~5% of entries): 10^5 x 300 takes ~1.2 s, 0.4 s of it the sort (2-core VM).
    order = np.argsort(-y_prob, axis=1)
    s = np.take_along_axis(y_prob, order, axis=1)
    pos = np.flatnonzero(np.take_along_axis(y_true, order, axis=1))  # sorted flat positions
    row = pos // m
    # A tie group is one threshold: a positive takes the precision at the END of its group.
    # Tied neighbours are few, so runs of them are found on their own sparse index.
    end = pos.copy()
    tied = np.zeros((n, m), dtype=bool)
    tied[:, :-1] = s[:, :-1] == s[:, 1:]  # never across rows: the last column is never "tied"
    tied = np.flatnonzero(tied)
    if len(tied):
        last = np.r_[tied[1:] != tied[:-1] + 1, True]  # last tied position of each run
        run_end = np.repeat(tied[last] + 1, np.diff(np.r_[0, np.flatnonzero(last) + 1]))
        i = np.searchsorted(tied, pos)
        hit = i < len(tied)
        hit[hit] = tied[i[hit]] == pos[hit]
        end[hit] = run_end[i[hit]]
    tp_end = np.searchsorted(pos, end, side="right") - np.searchsorted(pos, row * m)  # positives ranked <= end
    k_end = end - row * m + 1  # items ranked <= end
    total = np.bincount(row, weights=tp_end / k_end, minlength=n)
    n_pos = np.bincount(row, minlength=n).astype(np.float64)
    return np.divide(total, n_pos, out=np.zeros(n), where=n_pos > 0)


def per_visit_metrics(
    y_true: np.ndarray, y_prob: np.ndarray | None, y_pred: np.ndarray, ddi: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Jaccard, PRAUC, F1, DDI rate and #Med of every visit.

    Args:
        y_true: [N, M] bool, the prescribed medications.
        y_prob: [N, M] float probabilities, or None (PRAUC is then NaN).
        y_pred: [N, M] bool, the recommended set.
        ddi: [M, M] bool symmetric interaction matrix, or None (DDI rate is then NaN).

    Returns:
        {"jaccard", "prauc", "f1", "ddi_rate", "n_med"} -> [N] float64 arrays.
    """
    y_true = np.asarray(y_true, dtype=bool)
    y_pred = np.asarray(y_pred, dtype=bool)
    _check(y_true, y_pred, "y_pred")
    n, m = y_true.shape
    inter = np.count_nonzero(y_true & y_pred, axis=1).astype(np.float64)
    n_true = np.count_nonzero(y_true, axis=1).astype(np.float64)
    n_med = np.count_nonzero(y_pred, axis=1).astype(np.float64)
    union = n_true + n_med - inter
    out = {
        "jaccard": np.divide(inter, union, out=np.zeros(n), where=union > 0),
        "prauc": average_precision(y_true, y_prob) if y_prob is not None else np.full(n, np.nan),
        "f1": np.divide(2 * inter, n_true + n_med, out=np.zeros(n), where=(n_true + n_med) > 0),
        "ddi_rate": np.full(n, np.nan),
        "n_med": n_med,
    }
    if ddi is not None:
        ddi = np.asarray(ddi, dtype=bool)
        if ddi.shape != (m, m):
            raise ValueError(f"ddi matrix has shape {ddi.shape}, expected ({m}, {m}) for {m} medications")
        d = np.triu(ddi | ddi.T, k=1).astype(np.float32)  # each unordered pair once, no self-pairs
        p = y_pred.astype(np.float32)
        # [N, M] @ [M, M] -> [N, M]; one float32 GEMM (~9 GFLOP at 10^5 x 300) beats looping pairs.
        bad = np.einsum("nm,nm->n", p @ d, p).astype(np.float64)
        pairs = n_med * (n_med - 1) / 2
        out["ddi_rate"] = np.divide(bad, pairs, out=np.zeros(n), where=pairs > 0)
    return out


def summarize(per_visit: dict[str, np.ndarray], index: np.ndarray | None = None) -> dict[str, float]:
    """Aggregate per-visit metrics (optionally of the visits `index`): means; DDI rate pooled."""
    rows = {k: (v if index is None else v[index]) for k, v in per_visit.items()}
    out: dict[str, float] = {}
    for k in METRICS:
        v = rows[k]
        if k == "ddi_rate":
            pairs = rows["n_med"] * (rows["n_med"] - 1) / 2
            total = pairs.sum()
            out[k] = float(np.nan if np.isnan(v).any() else np.rint(v * pairs).sum() / total if total > 0 else 0.0)
        else:
            out[k] = float(v.mean()) if len(v) else float("nan")
    return out


def score(y_true: np.ndarray, y_prob: np.ndarray, threshold: float = 0.5, ddi: np.ndarray | None = None) -> dict[str, float]:
    """Mean metrics of recommending every medication with probability >= `threshold`.

    Args:
        y_true: [N, M] bool. y_prob: [N, M] float. ddi: [M, M] bool or None.

    Returns:
        {"jaccard", "prauc", "f1", "ddi_rate" (pooled), "n_med"} -> float.
    """
    y_prob = np.asarray(y_prob)
    return summarize(per_visit_metrics(y_true, y_prob, y_prob >= threshold, ddi))


def _unit_sums(per_visit: dict[str, np.ndarray], units: np.ndarray, n_units: int) -> dict[str, np.ndarray]:
    """Per unit: the sum of each per-patient metric's visit means (1 term per unit), visit counts,
    and the pooled quantities (#Med, interacting and all pairs) summed over the unit's visits."""
    count = np.bincount(units, minlength=n_units).astype(np.float64)
    safe = np.maximum(count, 1)
    out = {k: np.bincount(units, weights=per_visit[k], minlength=n_units) / safe for k in ("jaccard", "prauc", "f1")}
    pairs = per_visit["n_med"] * (per_visit["n_med"] - 1) / 2
    ddi = per_visit["ddi_rate"]
    out["bad"] = np.bincount(units, weights=np.nan_to_num(np.rint(ddi * pairs)), minlength=n_units)
    out["pairs"] = np.bincount(units, weights=pairs, minlength=n_units)
    out["n_med"] = np.bincount(units, weights=per_visit["n_med"], minlength=n_units)
    out["visits"] = count
    out["ddi_nan"] = bool(np.isnan(ddi).any())
    return out


def _summarize_draw(sums: dict, draw: np.ndarray) -> dict[str, float]:
    """Metrics of a draw of units (indices, repeats allowed): unit means averaged; DDI rate and #Med
    pooled over the drawn units' visits (GAMENet/SafeDrug: global pair and visit counters)."""
    if len(draw) == 0:
        return {k: float("nan") for k in METRICS}
    out = {k: float(sums[k][draw].mean()) for k in ("jaccard", "prauc", "f1")}
    pairs = sums["pairs"][draw].sum()
    out["ddi_rate"] = float("nan") if sums["ddi_nan"] else float(sums["bad"][draw].sum() / pairs) if pairs > 0 else 0.0
    out["n_med"] = float(sums["n_med"][draw].sum() / max(sums["visits"][draw].sum(), 1))
    return out


def subsample_mean_std(
    per_visit: dict[str, np.ndarray], rounds: int = 10, frac: float = 0.8, seed: int = 0, *, replace: bool = True,
    units: np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """LEADER's protocol: the metrics of `rounds` random `frac` subsamples, mean and std.

    The SafeDrug/LEADER test code draws each subsample with `np.random.choice(..., replace=True)`;
    `replace=True` is therefore the default. std is numpy's population std (ddof=0), as there.

    Args:
        units: [N] int, the unit (patient) of each visit, 0..U-1. Draws are of units and a unit's
            visits are averaged first (SafeDrug's per-patient means). None: every visit is a unit.

    Returns:
        metric -> (mean, std) over the rounds.
    """
    if rounds < 1 or not 0 < frac <= 1:
        raise ValueError(f"rounds={rounds}, frac={frac}: need rounds >= 1 and 0 < frac <= 1")
    n = len(per_visit["jaccard"])
    if n == 0:
        return {k: (float("nan"), float("nan")) for k in METRICS}
    units = np.arange(n) if units is None else np.asarray(units)
    n_units = int(units.max()) + 1
    sums = _unit_sums(per_visit, units, n_units)
    present = np.flatnonzero(sums["visits"] > 0)
    rng = np.random.default_rng(seed)
    size = max(1, int(round(len(present) * frac)))
    results = [_summarize_draw(sums, rng.choice(present, size=size, replace=replace)) for _ in range(rounds)]
    return {k: (float(np.mean([r[k] for r in results])), float(np.std([r[k] for r in results]))) for k in METRICS}


def point_estimate(per_visit: dict[str, np.ndarray], units: np.ndarray | None = None) -> dict[str, float]:
    """The metrics over every unit once (no subsampling): the number `mean ± std` estimates."""
    n = len(per_visit["jaccard"])
    units = np.arange(n) if units is None else np.asarray(units)
    if n == 0:
        return {k: float("nan") for k in METRICS}
    sums = _unit_sums(per_visit, units, int(units.max()) + 1)
    return _summarize_draw(sums, np.flatnonzero(sums["visits"] > 0))


def unit_values(values: np.ndarray, units: np.ndarray | None = None) -> np.ndarray:
    """[U] per-unit means of a per-visit metric (the unit's visits averaged); [N] as is without units."""
    values = np.asarray(values, dtype=np.float64)
    if units is None:
        return values
    units = np.asarray(units)
    count = np.bincount(units, minlength=int(units.max()) + 1 if len(units) else 0)
    return np.bincount(units, weights=values, minlength=len(count)) / np.maximum(count, 1)


def paired_interval(
    a: np.ndarray, b: np.ndarray, *, rounds: int = 2000, level: float = 0.95, seed: int = 0,
    resample_seeds: bool = False, paired_seeds: bool | None = None,
) -> tuple[float, float, float]:
    """Mean difference a - b over the same units with a paired bootstrap percentile interval.

    Args:
        a, b: [S, U] or [U] per-unit values of two models (S seeds, U units - the same patients in
            the same order).
        resample_seeds: False: seeds are pooled - each unit's values are averaged over seeds first,
            so the interval reflects patient sampling of the seed-averaged model only. True: a
            two-level bootstrap - each round also draws each model's training seeds with
            replacement (the same seed indices for both when they have as many seeds, so a pair
            trained with one seed stays paired), so the interval carries the spread between training
            runs too. A model with one seed (a deterministic baseline, or one run) keeps its row.
        paired_seeds: whether row i of `a` and row i of `b` were trained with the same seed (so
            are drawn together); None: when they have as many rows. Give False when the rows are
            different seeds: each model's seeds are then drawn on their own.

    Returns:
        (difference, low, high) at `level` (e.g. 0.95).
    """
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired values need the same units: {a.shape[1]} vs {b.shape[1]}")
    d = a.mean(0) - b.mean(0)  # [U]
    u = len(d)
    if u == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(rounds)
    two_level = resample_seeds and max(len(a), len(b)) > 1
    paired = len(a) == len(b) and (paired_seeds is None or paired_seeds)
    step = max(1, 4_000_000 // u)  # bound a block's [rounds, U] arrays to ~32 MB
    for start in range(0, rounds, step):
        k = min(step, rounds - start)
        if not two_level:
            means[start:start + k] = d[rng.integers(0, u, size=(k, u))].mean(1)
            continue
        # A round's mean is sum_s sum_u c_s w_u x[s, u] / (S U) with c the drawn seed counts and w
        # the drawn patient counts: one [k, U] @ [U, S] product per block of rounds, not a gather.
        draws = rng.integers(0, u, size=(k, u)) + np.arange(k)[:, None] * u  # round r's patients -> r*U + j
        w = np.bincount(draws.ravel(), minlength=k * u).reshape(k, u).astype(np.float64)  # [k, U] patient counts
        ca = rng.multinomial(len(a), np.full(len(a), 1.0 / len(a)), size=k)  # [k, S_a] seed counts
        cb = ca if paired else rng.multinomial(len(b), np.full(len(b), 1.0 / len(b)), size=k)
        means[start:start + k] = ((w @ a.T) * ca).sum(1) / (len(a) * u) - ((w @ b.T) * cb).sum(1) / (len(b) * u)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(d.mean()), float(lo), float(hi)


def by_group(
    per_visit: dict[str, np.ndarray], multi_visit: np.ndarray, rounds: int = 10, frac: float = 0.8, seed: int = 0,
    units: np.ndarray | None = None,
) -> dict[str, dict]:
    """`subsample_mean_std` overall and for single-visit vs multi-visit patients.

    Args:
        per_visit: output of `per_visit_metrics`.
        multi_visit: [N] bool, True where the visit's patient has more than one visit.
        units: [N] patient unit of each visit (see `subsample_mean_std`); None: visits are units.

    Returns:
        {"overall", "single_visit", "multi_visit"} -> metric -> (mean, std); a group with no
        visit has NaN everywhere. Key "n" of each group is (units, 0.0); key "point" holds
        `point_estimate` (metric -> float) over every unit of the group.
    """
    multi_visit = np.asarray(multi_visit, dtype=bool)
    if multi_visit.shape != per_visit["jaccard"].shape:
        raise ValueError(f"multi_visit has shape {multi_visit.shape}, per-visit metrics {per_visit['jaccard'].shape}")
    masks = {"overall": np.ones_like(multi_visit), "single_visit": ~multi_visit, "multi_visit": multi_visit}
    return by_masks(per_visit, masks, rounds=rounds, frac=frac, seed=seed, units=units)


def by_masks(
    per_visit: dict[str, np.ndarray], masks: dict[str, np.ndarray], *, rounds: int = 10, frac: float = 0.8, seed: int = 0,
    units: np.ndarray | None = None,
) -> dict[str, dict]:
    """`subsample_mean_std` and `point_estimate` for each group of visits.

    Args:
        masks: group name -> [N] bool over the visits of `per_visit`.
        units: [N] patient unit of each visit; re-indexed within each group. None: visits are units.

    Returns:
        group -> metric -> (mean, std), plus "n" (units, 0.0) and "point" (metric -> float).
    """
    out = {}
    for name, mask in masks.items():
        mask = np.asarray(mask, dtype=bool)
        sub = {k: v[mask] for k, v in per_visit.items()}
        group_units = None if units is None else np.asarray(units)[mask]
        sub_units = None if group_units is None else np.unique(group_units, return_inverse=True)[1]
        stats: dict = subsample_mean_std(sub, rounds, frac, seed, units=sub_units)
        stats["n"] = (float(mask.sum() if group_units is None else len(np.unique(group_units))), 0.0)
        stats["point"] = point_estimate(sub, sub_units)
        out[name] = stats
    return out


def json_ready(x):
    """A metrics structure as JSON values: (mean, std) pairs -> {"mean", "std"}, a group's "n"
    -> int, numpy scalars -> Python, NaN -> null."""
    if isinstance(x, dict):
        return {str(k): int(v[0]) if k == "n" and isinstance(v, tuple) else json_ready(v) for k, v in x.items()}
    if isinstance(x, tuple) and len(x) == 2 and all(isinstance(v, float) for v in x):
        return {"mean": json_ready(x[0]), "std": json_ready(x[1])}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if np.isnan(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def tune_threshold(
    y_true: np.ndarray, y_prob: np.ndarray, grid: Sequence[float] | None = None, metric: str = "jaccard"
) -> float:
    """The threshold of `grid` maximising the mean `metric` ("jaccard" or "f1") on validation.

    Ties go to the smallest threshold.
    """
    if metric not in ("jaccard", "f1"):
        raise ValueError(f"metric {metric!r} cannot be tuned by a threshold; use 'jaccard' or 'f1'")
    y_true = np.asarray(y_true, dtype=bool)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    _check(y_true, y_prob, "y_prob")
    grid = list(grid if grid is not None else THRESHOLD_GRID)
    if not grid:
        raise ValueError("empty threshold grid")
    values = [per_visit_metrics(y_true, None, y_prob >= t)[metric].mean() for t in grid]
    best = grid[int(np.argmax(values))]
    log.info("threshold %.3f maximises validation %s (%.4f)", best, metric, max(values))
    return float(best)


def ddi_matrix(pairs: Iterable[tuple[str, str]], med_codes: list[str]) -> np.ndarray:
    """[M, M] symmetric bool matrix over `med_codes`; pairs naming other codes are skipped
    (counted in the log: a DDI list usually covers more drugs than a dataset keeps)."""
    index = {c: i for i, c in enumerate(med_codes)}
    out = np.zeros((len(med_codes), len(med_codes)), dtype=bool)
    skipped = 0
    for a, b in pairs:
        if a in index and b in index:
            out[index[a], index[b]] = out[index[b], index[a]] = True
        else:
            skipped += 1
    if skipped:
        log.info("ddi_matrix: %d pair(s) name medications outside the %d-code vocabulary; skipped", skipped, len(med_codes))
    return out


def format_table(groups: dict[str, dict], title: str = "") -> str:
    """A plain-text table: one row per group, `point (mean +- std)` per metric, "-" where NaN.

    The point estimate is over every scored unit; mean +- std over the protocol's subsamples."""
    head = ["group", "n", *METRICS]
    rows = []
    for name, stats in groups.items():
        cells = [name, str(int(stats["n"][0])) if "n" in stats else ""]
        point = stats.get("point", {})
        for k in METRICS:
            mean, std = stats[k]
            p = point.get(k)
            lead = "" if p is None or np.isnan(p) else f"{p:.4f} "
            cells.append("-" if np.isnan(mean) else f"{lead}({mean:.4f} +- {std:.4f})")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
