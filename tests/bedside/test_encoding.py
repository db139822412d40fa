"""The student's encoding: right-aligned visits, shifted medications, caps, unknowns, round trip."""

import subprocess
import sys

import numpy as np
import pytest

from leader_edge.bedside.encoding import INPUT_NAMES, Encoder, RawVisit

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
    with pytest.raises(ValueError, match="no patients"):
        enc().encode([])
    with pytest.raises(ValueError, match="no visits"):
        enc().encode([[]])
    with pytest.raises(ValueError, match="lacks kind"):
        Encoder({"diagnosis": []})


def test_encoding_imports_without_torch():
    code = "import sys, leader_edge.bedside.encoding; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# The vectorised encoder against the encoding written out plainly, one visit at a time.


def _reference_encode(e: Encoder, patients: list) -> dict[str, np.ndarray]:
    """The spec of `Encoder.encode` (the module docstring's conventions), as a per-visit loop."""
    def ids(kind, codes):
        out, unknown = [], 0
        for c in codes:
            i = e._index[kind].get(c)
            if i is None:
                unknown += 1
            elif i not in out:
                out.append(i)
        return out[: e.max_codes], unknown

    def pad(rows):
        out = np.full((len(rows), max([1, *map(len, rows)])), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    kept = [list(p)[-e.max_visits:] for p in patients]
    b, k = len(kept), max(map(len, kept))
    rows = {kind: [[] for _ in range(b * k)] for kind in ("diagnosis", "procedure", "medication")}
    mask, unknown, targets = np.zeros((b, k), dtype=np.int64), np.zeros(b, dtype=np.int64), []
    for i, visits in enumerate(kept):
        start = k - len(visits)
        mask[i, start:] = 1
        for j, v in enumerate(visits):
            for kind, codes in (("diagnosis", v.diagnoses), ("procedure", v.procedures)):
                rows[kind][i * k + start + j], n = ids(kind, codes)
                unknown[i] += n
            meds, n = ids("medication", v.medications)
            if j + 1 < len(visits):
                rows["medication"][i * k + start + j + 1] = meds
                unknown[i] += n
            else:
                targets.append(meds)
    profile = [e.profile_ids(p[-1].profile) or [-1] for p in kept]
    return {"diagnoses": pad(rows["diagnosis"]).reshape(b, k, -1), "procedures": pad(rows["procedure"]).reshape(b, k, -1),
            "medications": pad(rows["medication"]).reshape(b, k, -1), "profile": np.array(profile, dtype=np.int64),
            "visit_mask": mask, "target_medications": pad(targets), "unknown": unknown}


def _reference_counts(e: Encoder, histories: list) -> tuple[list[int], list[int]]:
    """(codes as written, distinct known codes beyond max_codes) in what the model reads of each history."""
    written, over = [], []
    for history in histories:
        kept = history[-e.max_visits:]
        w = o = 0
        for j, v in enumerate(kept):
            lists = [("diagnosis", v.diagnoses), ("procedure", v.procedures)]
            lists += [("medication", v.medications)] if j + 1 < len(kept) else []
            for kind, codes in lists:
                w += len(codes)
                o += max(0, len({c for c in codes if c in e._index[kind]}) - e.max_codes)
        written.append(w)
        over.append(o)
    return written, over


DIAG, PROC, MEDS = [f"D{i}" for i in range(12)], ["P1", "P22", "P333"], ["M1", "M22", "M3", "M4444", "M5"]
CSV_HEADER = "patient_id,visit_id,visit_time,diagnoses,procedures,medications,profile_insurance\n"


def _random_patients(seed: int, patients: int = 60) -> list[list[RawVisit]]:
    """Unknown and repeated codes, lists over a 4-code cap, empty lists, histories over a 3-visit
    cap, profile values unseen in training."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(patients):
        visits = []
        for _ in range(int(rng.integers(1, 6))):
            lists = [[str(c) for c in rng.choice(vocab + ["X9", "Y8"], size=int(rng.integers(0, 8)))]
                     for vocab in (DIAG, PROC, MEDS)]
            visits.append(RawVisit(*lists, {"insurance": str(rng.choice(["Medicare", "Private", "Other", ""]))}))
        out.append(visits)
    return out


def _as_csv(patients: list[list[RawVisit]]) -> str:
    return CSV_HEADER + "".join(f"p{p},v{p}_{j},2100-01-{j + 1:02d},{';'.join(v.diagnoses)},{';'.join(v.procedures)},"
                                f"{';'.join(v.medications)},{v.profile['insurance']}\n"
                                for p, visits in enumerate(patients) for j, v in enumerate(visits))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("caps", [{"max_visits": 3, "max_codes": 4}, {"max_visits": 1, "max_codes": 1}, {}])
def test_encoder_encode_and_encode_table_equal_reference(seed, caps):
    import io

    from leader_edge.bedside.visit_stream import read_patients

    e = Encoder({"diagnosis": DIAG, "procedure": PROC, "medication": MEDS},
                {"insurance": ["Medicare", "Private"], "language": ["ENGL"]}, **caps)
    patients = _random_patients(seed)
    every = [p[:end] for p in patients for end in range(1, len(p) + 1)]
    for name, want in _reference_encode(e, patients).items():
        np.testing.assert_array_equal(getattr(e.encode(patients), name), want, err_msg=name)
    tables = list(read_patients(io.BytesIO(_as_csv(patients).encode()), "v.csv", chunk_patients=17))
    first = 0
    for table in tables:  # chunks of 17 patients: the table path sees the same visits as text columns
        mine = patients[first : first + len(table)]
        first += len(table)
        visits = e.encode_table(table)
        for ends, histories in ((table.starts[1:] - 1, mine), (np.arange(len(table.visit_ids)), None)):
            histories = histories or [p[:end] for p in mine for end in range(1, len(p) + 1)]
            for name, want in _reference_encode(e, histories).items():
                np.testing.assert_array_equal(getattr(visits.batch(ends), name), want, err_msg=name)
            assert [a.tolist() for a in visits.read_counts(ends)] == list(_reference_counts(e, histories))
            cost = [(min(len(h), e.max_visits), sum(len(v.diagnoses) + len(v.procedures) for v in h[-e.max_visits:]))
                    for h in histories]
            assert visits.size_order(ends).tolist() == sorted(range(len(histories)), key=cost.__getitem__)
            sub = ends[::3]  # some targets only: widths pad to that batch's longest row
            np.testing.assert_array_equal(visits.batch(sub).diagnoses, _reference_encode(e, histories[::3])["diagnoses"])
    assert first == len(patients) and _reference_encode(e, every)["unknown"].sum() > 0


def test_encoder_counts_codes_beyond_the_limit():
    """A 7-code visit under a 4-code limit: 3 codes beyond it (repeats and unknown codes are not),
    in the history of the next visit too, but not the current visit's own medications."""
    e = Encoder({"diagnosis": DIAG, "procedure": PROC, "medication": MEDS}, max_codes=4)
    first = RawVisit(["D1", "D2", "D3", "D4", "D5", "D6", "D7", "D1", "X9"], ["P1"], MEDS)
    patients = [[first], [first, RawVisit(["D1"], [], MEDS)]]
    visits = e.encode_visits(patients)
    written, over = visits.read_counts(visits.last_rows())
    assert over.tolist() == [3, 3 + 1]  # the second reads the first's diagnoses and medications (5 > 4)
    assert written.tolist() == [9 + 1, 9 + 1 + 5 + 1]
