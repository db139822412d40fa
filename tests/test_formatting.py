"""Whole-chunk CSV formatting (`csv_chunk`, `score_order`) equals the per-row reference."""

import types

import numpy as np
from test_runtime import _reference_csv

from leader_edge.formatting import csv_chunk, plain_codes, score_order
from leader_edge.runtime import Scored


def test_formatting_score_order_equals_stable_argsort():
    rng = np.random.default_rng(0)
    prob = rng.random((50, 9)).astype(np.float32)
    prob[prob < 0.3] = 0.25  # ties keep column order
    prob[0] = 0.0
    prob[1, 4] = 1.0
    assert np.array_equal(score_order(prob), np.argsort(-prob, axis=1, kind="stable"))
    prob[2, 2] = np.nan  # not a probability: the plain sort, same answer
    assert np.array_equal(score_order(prob), np.argsort(-prob, axis=1, kind="stable"))


def test_formatting_csv_chunk_matches_per_row_reference():
    codes = ["A1", "B", "C333", "D4", "E55555"]  # unequal widths: the NUL-padding path
    ddi = np.array([[0, 2], [3, 4], [1, 4]])
    bundle = types.SimpleNamespace(med_codes=codes, ddi=ddi, threshold=0.5)
    rng = np.random.default_rng(0)
    prob = rng.random((6, len(codes))).astype(np.float32) ** 3
    prob[1] = 0.0  # nothing listed
    prob[2] = [0.9, 0.00004, 0.9, 0.5, 0.7]  # ties, the threshold, a score that rounds to 0
    for ids in (["p1", "p2", "p3", "p4", "p5", "p6"], ["p1", "p,2", "p3", 'p"4', "p5", "p6"]):
        scored = Scored(ids, [f"v{i}" for i in range(6)], prob, np.array([0, 3, 0, 1, 0, 12]))
        got = csv_chunk(bundle, scored, plain_codes=plain_codes(codes))
        assert got == _reference_csv(codes, ddi, scored, 0.5).encode()
    assert b"A1+C333" in got and got.splitlines()[1].endswith(b",,,,3")
