"""Per-visit metrics at MIMIC scale and beyond: vectorised numpy vs the per-row reference.

    .venv/bin/python benchmarks/bench_metrics.py [--visits 100000] [--meds 300] [--repeats 3]

The reference is what the GAMENet/SafeDrug code does: a Python loop per visit with sklearn's
`average_precision_score` for PRAUC; it is timed on a slice and scaled linearly to all visits.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import numpy as np
from sklearn.metrics import average_precision_score

from leader_edge.evaluation.metrics import average_precision, per_visit_metrics


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def loop_reference(y_true: np.ndarray, y_pred: np.ndarray, ddi: np.ndarray) -> None:
    for t, p in zip(y_true, y_pred):
        pred, true = set(np.flatnonzero(p)), set(np.flatnonzero(t))
        union = len(pred | true)
        _ = len(pred & true) / union if union else 0.0
        idx = sorted(pred)
        _ = sum(ddi[a, b] for i, a in enumerate(idx) for b in idx[i + 1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--visits", type=int, default=100_000)
    ap.add_argument("--meds", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n, m = args.visits, args.meds
    y_true = rng.random((n, m)) < 0.05  # ~15 true medications per visit, as in MIMIC-III
    y_prob = rng.random((n, m)).astype(np.float32)
    y_pred = y_prob >= 0.95
    ddi = rng.random((m, m)) < 0.05
    ddi |= ddi.T
    ref_n = min(n, 2000)

    def sklearn_ap():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            [average_precision_score(t, p) for t, p in zip(y_true[:ref_n], y_prob[:ref_n])]

    rows = [
        ("jaccard+f1+n_med", median_seconds(lambda: per_visit_metrics(y_true, None, y_pred), args.repeats),
         median_seconds(lambda: loop_reference(y_true[:ref_n], y_pred[:ref_n], np.zeros_like(ddi)), args.repeats) * n / ref_n),
        ("jaccard+f1+ddi+n_med", median_seconds(lambda: per_visit_metrics(y_true, None, y_pred, ddi), args.repeats),
         median_seconds(lambda: loop_reference(y_true[:ref_n], y_pred[:ref_n], ddi), args.repeats) * n / ref_n),
        ("prauc", median_seconds(lambda: average_precision(y_true, y_prob), args.repeats),
         median_seconds(sklearn_ap, args.repeats) * n / ref_n),
    ]
    print(f"{n} visits x {m} medications, median of {args.repeats}, load average {os.getloadavg()[0]:.2f}")
    print(f"{'metric':<22}{'numpy s':>10}{'per-row loop s':>16}{'speed-up':>10}")
    for name, ours, ref in rows:
        print(f"{name:<22}{ours:>10.3f}{ref:>16.1f}{ref / ours:>9.0f}x")


if __name__ == "__main__":
    main()
