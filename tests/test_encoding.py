"""The student's encoding: right-aligned visits, shifted medications, caps, unknowns, round trip."""

import subprocess
import sys

import numpy as np
import pytest

from leader_edge.encoding import INPUT_NAMES, Encoder, RawVisit

VOCAB = {"diagnosis": ["d1", "d2", "d3"], "procedure": ["p1", "p2"], "medication": ["m1", "m2", "m3"]}
PROFILE = {"sex": ["F", "M"], "insurance": ["private", "public"]}


def enc(**caps) -> Encoder:
    return Encoder(VOCAB, PROFILE, **caps)


def test_encoder_right_aligns_visits_and_shifts_medications():
    two = [RawVisit(["d1"], ["p1"], ["m1", "m2"], {"sex": "F"}), RawVisit(["d2"], [], ["m3"], {"sex": "M"})]
    one = [RawVisit(["d3"], ["p2"], ["m2"])]
    b = enc().encode([two, one])
    assert b.visit_mask.tolist() == [[1, 1], [0, 1]]
    # shared ids: diagnoses 0..2, procedures 3..4, medications 5..7
    assert b.diagnoses[:, :, 0].tolist() == [[0, 1], [-1, 2]]
    assert b.procedures[1, 1].tolist() == [4]
    # slot t holds the previous visit's medications; the oldest slot and the target are not inputs
    assert b.medications[0].tolist() == [[-1, -1], [5, 6]]
    assert (b.medications[1] == -1).all()
    assert b.target_medications.tolist() == [[7], [6]]
    # the profile comes from the current visit; missing fields get the field's unknown id 0
    assert b.profile.tolist() == [[2, 3], [0, 3]]
    assert all(getattr(b, n).dtype == np.int64 for n in INPUT_NAMES)
    assert enc().multi_hot([two, one]).tolist() == [[0, 0, 1], [0, 1, 0]]


def test_encoder_keeps_last_visits_and_first_unique_codes():
    visits = [RawVisit([f"d{i}"], [], [f"m{i}"]) for i in (1, 2, 3)]
    visits.append(RawVisit(["d3", "d1", "d3", "d2"], [], []))
    b = enc(max_visits=2, max_codes=2).encode([visits])
    assert b.visit_mask.shape == (1, 2)
    assert b.diagnoses[0].tolist() == [[2, -1], [2, 0]]  # visit 3, then the current one: d3, d1 (dedup, cap 2)
    assert b.medications[0].tolist() == [[-1], [7]]  # oldest kept slot empty; current sees visit 3's m3


def test_encoder_counts_unknown_codes_and_values():
    b = enc().encode([[RawVisit(["d1", "x1"], ["x2"], ["m9"], {"sex": "?", "insurance": "public"})]])
    assert b.unknown.tolist() == [2]  # the target's own unknown medication is not an input
    assert b.profile.tolist() == [[0, 5]]
    assert b.diagnoses.tolist() == [[[0]]] and b.procedures.tolist() == [[[-1]]]


def test_encoder_json_round_trip_and_profile_from_visits():
    visits = [RawVisit([], [], [], (("sex", "M"), ("insurance", "public"))), RawVisit([], [], [], {"sex": "F"})]
    e = Encoder.from_visits(VOCAB, visits, max_visits=3)
    assert e.profile_values == {"sex": ["F", "M"], "insurance": ["public"]}
    back = Encoder.from_json(e.to_json())
    assert back.to_json() == e.to_json() and back.n_profile_ids == 5 and back.med_offset == 5


def test_encoder_without_profile_fields_pads_one_column():
    b = Encoder(VOCAB).encode([[RawVisit(["d1"], [], [])]])
    assert b.profile.tolist() == [[-1]]


def test_encoder_rejects_empty_input():
    with pytest.raises(ValueError, match="no visits"):
        enc().encode([[]])
    with pytest.raises(ValueError, match="lacks kind"):
        Encoder({"diagnosis": []})


def test_encoding_imports_without_torch():
    code = "import sys, leader_edge.encoding; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
