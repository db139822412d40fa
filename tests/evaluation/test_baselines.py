"""Frequency baseline: out-of-fold scores never see the scored patient."""

import dataclasses

import numpy as np
import pytest

from leader_edge.evaluation.baselines import FrequencyBaseline, out_of_fold_proba
from leader_edge.data.splits import dataset_splits
from leader_edge.data.synth import synth_dataset


@pytest.fixture(scope="module")
def ds():
    return synth_dataset(patients=60, seed=5)


def test_out_of_fold_proba_ignores_the_scored_patients_own_labels(ds):
    train = dataset_splits(ds, train_all_visits=True)["train"]
    before = out_of_fold_proba(ds, train, rule="max", smoothing=2.0, folds=3, seed=1)
    # Give a single-visit patient every medication (its labels; a single visit has no medication
    # inputs): its own row must not move, while rows scored by models fitted on it must.
    target = next(p for p, v in ds.patients().items() if len(v) == 1 and p in {s.patient_id for s in train})
    meds = tuple(ds.vocab("medication"))
    visits = [dataclasses.replace(v, medications=meds) if v.patient_id == target else v for v in ds.visits]
    changed = dataclasses.replace(ds, visits=visits)
    train2 = dataset_splits(changed, train_all_visits=True)["train"]
    after = out_of_fold_proba(changed, train2, rule="max", smoothing=2.0, folds=3, seed=1)
    own = np.array([s.patient_id == target for s in train])
    assert before.shape == (len(train), len(meds))
    np.testing.assert_array_equal(before[own], after[own])
    assert np.abs(before[~own] - after[~own]).max() > 0.01


def test_out_of_fold_proba_differs_from_in_sample_scores(ds):
    train = dataset_splits(ds, train_all_visits=True)["train"]
    oof = out_of_fold_proba(ds, train, rule="max", smoothing=2.0, folds=5)
    fitted = FrequencyBaseline.fit(ds, train, rule="max", smoothing=2.0).predict_proba(train)
    y = np.array([[c in s.target.medications for c in ds.vocab("medication")] for s in train])
    # In-sample counts contain the target, so they score the truth higher than held-out ones do.
    assert fitted[y].mean() > oof[y].mean() + 0.02
    with pytest.raises(ValueError, match="folds"):
        out_of_fold_proba(ds, train, rule="max", smoothing=2.0, folds=1)
