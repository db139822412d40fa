"""Student initialisation: co-occurrence log-odds, low rank, budget, teacher name embeddings (tiny backbone)."""

import json

import numpy as np
import pytest
from safetensors import safe_open

from leader_edge.data.dataset import load_dataset, write_dataset
from leader_edge.bedside.encoding import KINDS, Encoder, RawVisit
from leader_edge.data.synth import synth_dataset
from leader_edge.train import code_embeddings
from leader_edge.train.code_embeddings import CODE_EMBEDDINGS, cached_name_vectors, name_vectors, pca_init
from leader_edge.train.student_init import (
    LOW_RANK, cooc_log_odds, low_rank, name_neighbour_prior, teacher_name_vectors, wide_rank,
)

VOCAB = {"diagnosis": ["486", "5849"], "procedure": ["3961"], "medication": ["A02B", "B01A"]}


def test_cooc_log_odds_lifts_co_occurring_medications_and_smooths_rare_codes():
    enc = Encoder(VOCAB)
    # 486 always with A02B (4 visits); 5849 once with B01A; 3961 never seen.
    patients = [[RawVisit(["486"], [], ["A02B"])]] * 4 + [[RawVisit(["5849"], [], ["B01A"])]] * 1 + [[RawVisit([], [], ["B01A"])]] * 3
    table = cooc_log_odds(enc.encode(patients), enc.multi_hot(patients), enc.n_codes, smoothing=2.0)
    assert table.shape == (enc.n_codes, enc.n_meds)
    assert table[0, 0] > 0 > table[0, 1]  # 486 -> A02B up, B01A down
    assert 0 < table[1, 1] < table[0, 0]  # one visit: pulled toward the prior
    np.testing.assert_array_equal(table[2], 0)  # unseen code: no lift
    # P(A02B | 486) = (4 + 2 * 0.5) / (4 + 2) = 5/6 against prior 0.5
    assert table[0, 0] == pytest.approx(np.log(5), rel=1e-4)


def test_low_rank_reconstructs_a_low_rank_table_and_budget_picks_it():
    rng = np.random.default_rng(0)
    table = (rng.normal(size=(30, 3)) @ rng.normal(size=(3, 7))).astype(np.float32)
    left, right = low_rank(table, 3)
    assert left.shape == (30, 3) and right.shape == (3, 7)
    np.testing.assert_allclose(left @ right, table, atol=1e-4)
    assert wide_rank(1461, 135, 575_000) == 0  # default synth: the full table fits
    assert wide_rank(3540, 150, 731_000) == LOW_RANK  # MIMIC-III size: it does not


def test_pca_init_fits_on_training_rows_and_scales():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 12)).astype(np.float32)
    fit = np.arange(50) < 40
    out = pca_init(vectors, fit, dim=16, scale=0.1)
    assert out.shape == (50, 16) and out.dtype == np.float32
    assert out[fit].std() == pytest.approx(0.1, rel=1e-4)
    np.testing.assert_array_equal(out[:, 12:], 0)  # only 12 axes exist
    moved = vectors.copy()
    moved[~fit] += 100  # held-out rows never shape the axes
    np.testing.assert_allclose(pca_init(moved, fit, 16, 0.1)[fit], out[fit], atol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        pca_init(vectors, np.arange(50) < 1, 4, 0.1)


def test_name_vectors_differ_by_name_and_method():
    names = ["Pneumonia, organism NOS", "Pneumonia, organism NOS", "Acute kidney failure NOS"]
    vec = name_vectors(names, "tiny", method="input")
    assert vec.shape == (3, 32)
    np.testing.assert_allclose(vec[0], vec[1])
    assert np.abs(vec[0] - vec[2]).max() > 1e-3
    hidden = name_vectors(names, "tiny", method="hidden", layers=1)
    assert hidden.shape == (3, 32) and np.abs(hidden - vec).max() > 1e-3
    with pytest.raises(ValueError, match="method"):
        name_vectors(names, "tiny", method="output")


def test_cached_name_vectors_reuse_the_file_until_keys_change(tmp_path, monkeypatch):
    path = tmp_path / CODE_EMBEDDINGS
    first = cached_name_vectors(path, ["diagnosis:486"], ["Pneumonia"], "tiny", method="input", layers=4)
    with safe_open(str(path), framework="numpy") as f:
        assert json.loads(f.metadata()["keys"]) == ["diagnosis:486"] and f.metadata()["spec"] == "tiny"
    calls = []
    real = code_embeddings.name_vectors
    monkeypatch.setattr(code_embeddings, "name_vectors", lambda *a, **k: calls.append(a) or real(*a, **k))
    np.testing.assert_array_equal(cached_name_vectors(path, ["diagnosis:486"], ["Pneumonia"], "tiny", method="input", layers=4), first)
    assert calls == []
    again = cached_name_vectors(path, ["diagnosis:486", "diagnosis:5849"], ["Pneumonia", "Renal"], "tiny", method="input", layers=4)
    assert len(calls) == 1 and again.shape == (2, 32)


def test_teacher_name_vectors_cover_every_code_and_need_a_spec(tmp_path):
    ds = load_dataset(write_dataset(synth_dataset(patients=40, seed=1), tmp_path / "data", source="synth"))
    enc = Encoder.from_visits({k: ds.vocab(k) for k in KINDS}, ds.visits)
    with pytest.raises(RuntimeError, match="names no teacher backbone"):
        teacher_name_vectors(ds, enc, tmp_path / "run", method="input", layers=1)
    out = teacher_name_vectors(ds, enc, tmp_path / "run", method="input", layers=1, spec="tiny")
    assert out.shape == (enc.n_codes, 32) and np.isfinite(out).all()
    assert (tmp_path / "run" / "teacher" / CODE_EMBEDDINGS).is_file()


def test_name_neighbour_prior_pools_the_nearest_seen_codes_of_the_same_kind():
    enc = Encoder({"diagnosis": ["a", "b", "c"], "procedure": ["p"], "medication": ["m1", "m2"]})
    patients = [[RawVisit(["a"], [], ["m1"])]] * 3 + [[RawVisit(["b"], ["p"], ["m2"])]] * 2
    # Names: c reads like a, b is far; p (a procedure) reads like c but is another kind.
    vectors = np.array([[1.0, 0.0], [-1.0, 0.1], [0.9, 0.1], [0.9, 0.12], [0.0, 1.0], [0.0, -1.0]], dtype=np.float32)
    kinds = np.array([0, 0, 0, 1, 2, 2])
    near = name_neighbour_prior(enc.encode(patients), enc.multi_hot(patients), vectors, kinds, k=1)
    np.testing.assert_allclose(near[2], [1.0, 0.0])  # c (never seen) borrows a's medications
    np.testing.assert_allclose(near[0], [0.0, 1.0])  # a's nearest other seen diagnosis is b
    np.testing.assert_allclose(near[3], [0.6, 0.4])  # p has no other procedure: the global prior
    lifted = cooc_log_odds(enc.encode(patients), enc.multi_hot(patients), enc.n_codes, 2.0, near)
    assert lifted[2, 0] > 0 > lifted[2, 1]
