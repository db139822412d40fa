import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from leader_edge.evaluation.metrics import (
    average_precision,
    by_group,
    ddi_matrix,
    format_table,
    per_visit_metrics,
    score,
    subsample_mean_std,
    summarize,
    tune_threshold,
)

B = lambda rows: np.array(rows, dtype=bool)  # noqa: E731


def test_per_visit_metrics_hand_worked():
    # visit 0: true {0,1,2}, pred {1,2,3} -> inter 2, union 4: jaccard 0.5, f1 2*2/6
    # visit 1: true {0}, pred {} -> jaccard 0, f1 0
    # visit 2: true {}, pred {} -> both 0 (GAMENet convention)
    y_true = B([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    y_pred = B([[0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    ddi = ddi_matrix([("m1", "m3")], ["m0", "m1", "m2", "m3"])
    pv = per_visit_metrics(y_true, None, y_pred, ddi)
    np.testing.assert_allclose(pv["jaccard"], [0.5, 0, 0])
    np.testing.assert_allclose(pv["f1"], [4 / 6, 0, 0])
    np.testing.assert_allclose(pv["n_med"], [3, 0, 0])
    # pairs of {1,2,3}: (1,2),(1,3),(2,3); one interacts
    np.testing.assert_allclose(pv["ddi_rate"], [1 / 3, 0, 0])
    assert np.isnan(pv["prauc"]).all()


def test_average_precision_hand_worked_with_ties():
    # ranks: 0.9(T) 0.8(F) 0.8(T) 0.1(F): the tie {0.8,0.8} is one threshold:
    # AP = 1/2 * (1/1) + 1/2 * (2/3) = 5/6
    ap = average_precision(B([[1, 0, 1, 0]]), np.array([[0.9, 0.8, 0.8, 0.1]]))
    assert ap[0] == pytest.approx(5 / 6)


def test_average_precision_no_true_medication_is_zero():
    ap = average_precision(B([[0, 0, 0]]), np.array([[0.2, 0.5, 0.1]]))
    assert ap.tolist() == [0.0]


@pytest.mark.parametrize("decimals", [1, 2, 6])
def test_average_precision_matches_sklearn_per_row(decimals):
    rng = np.random.default_rng(decimals)
    y_true = rng.random((300, 25)) < 0.2
    y_prob = np.round(rng.random((300, 25)), decimals)
    ours = average_precision(y_true, y_prob)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rows without a positive warn in sklearn
        ref = np.array([average_precision_score(t, p) for t, p in zip(y_true, y_prob)])
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_score_pools_ddi_rate_over_all_pairs():
    # visit 0 predicts {0,1} (1 pair, interacting); visit 1 predicts {0,2,3} (3 pairs, none):
    # pooled 1/4, while the mean of per-visit rates would be 1/2.
    y_prob = np.array([[0.9, 0.9, 0.1, 0.1], [0.9, 0.1, 0.9, 0.9]])
    y_true = B([[1, 1, 0, 0], [1, 0, 0, 0]])
    ddi = ddi_matrix([("a", "b")], ["a", "b", "c", "d"])
    out = score(y_true, y_prob, threshold=0.5, ddi=ddi)
    assert out["ddi_rate"] == pytest.approx(0.25)
    assert out["jaccard"] == pytest.approx((1 + 1 / 3) / 2)
    assert out["n_med"] == pytest.approx(2.5)
    # visit 1: its one true medication ties with two false ones at 0.9 -> AP 1/3
    assert out["prauc"] == pytest.approx((1 + 1 / 3) / 2)


def test_score_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        score(np.zeros((2, 3), bool), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="ddi matrix"):
        per_visit_metrics(np.zeros((2, 3), bool), None, np.zeros((2, 3), bool), np.zeros((2, 2), bool))


def test_ddi_matrix_symmetric_and_skips_unknown():
    d = ddi_matrix([("b", "a"), ("a", "zz")], ["a", "b", "c"])
    assert d.tolist() == [[False, True, False], [True, False, False], [False, False, False]]


def test_subsample_mean_std_constant_metric_has_zero_std():
    pv = {k: np.full(50, 0.5) for k in ("jaccard", "prauc", "f1", "ddi_rate")}
    pv["n_med"] = np.full(50, 4.0)
    out = subsample_mean_std(pv, rounds=10, frac=0.8, seed=0)
    assert out["jaccard"] == pytest.approx((0.5, 0.0))
    assert out["n_med"] == pytest.approx((4.0, 0.0))


def test_subsample_mean_std_deterministic_and_varies():
    rng = np.random.default_rng(0)
    pv = per_visit_metrics(rng.random((200, 10)) < 0.3, rng.random((200, 10)), rng.random((200, 10)) < 0.3)
    a = subsample_mean_std(pv, seed=3)
    assert a["jaccard"] == subsample_mean_std(pv, seed=3)["jaccard"]
    assert a["jaccard"][1] > 0
    assert abs(a["jaccard"][0] - pv["jaccard"].mean()) < 3 * a["jaccard"][1] + 1e-3
    assert np.isnan(a["ddi_rate"][0])  # no DDI matrix given


def test_by_group_splits_single_and_multi_visit():
    pv = per_visit_metrics(B([[1, 0], [1, 0], [0, 1]]), None, B([[1, 0], [0, 1], [0, 1]]))
    groups = by_group(pv, np.array([False, False, True]), rounds=3, frac=1.0)
    assert groups["multi_visit"]["jaccard"][0] == pytest.approx(1.0)
    assert groups["single_visit"]["n"] == (2.0, 0.0)
    assert groups["overall"]["n"] == (3.0, 0.0)
    table = format_table(groups)
    assert "single_visit" in table and "-" in table  # prauc not available


def test_by_group_empty_group_is_nan():
    pv = per_visit_metrics(B([[1, 0]]), None, B([[1, 0]]))
    groups = by_group(pv, np.array([False]))
    assert np.isnan(groups["multi_visit"]["jaccard"][0])


def test_tune_threshold_picks_separating_value():
    y_true = B([[1, 0, 1], [0, 1, 0]])
    y_prob = np.array([[0.7, 0.2, 0.65], [0.1, 0.6, 0.3]])
    t = tune_threshold(y_true, y_prob, grid=[0.1, 0.4, 0.62, 0.8])
    assert t == 0.4
    assert summarize(per_visit_metrics(y_true, y_prob, y_prob >= t))["jaccard"] == 1.0
    with pytest.raises(ValueError, match="jaccard"):
        tune_threshold(y_true, y_prob, metric="prauc")


def test_subsample_mean_std_per_patient_units_hand_worked():
    from leader_edge.evaluation.metrics import point_estimate

    # patient 0 has visits with Jaccard 0 and 1, patient 1 one visit with Jaccard 1:
    # per visit the mean is 2/3, per patient (0.5 + 1) / 2 = 3/4
    y_true = np.array([[1, 0], [1, 0], [0, 1]], dtype=bool)
    y_pred = np.array([[0, 1], [1, 0], [0, 1]], dtype=bool)
    pv = per_visit_metrics(y_true, None, y_pred)
    assert point_estimate(pv)["jaccard"] == pytest.approx(2 / 3)
    assert point_estimate(pv, np.array([0, 0, 1]))["jaccard"] == pytest.approx(0.75)
    # #Med stays pooled per visit: 3 predicted over 3 visits
    assert point_estimate(pv, np.array([0, 0, 1]))["n_med"] == pytest.approx(1.0)
    out = subsample_mean_std(pv, rounds=5, frac=1.0, seed=0, units=np.array([0, 0, 1]))
    assert 0.5 <= out["jaccard"][0] <= 1.0
