"""The torch-free runtime: bundle loading and proof, scoring, the in-memory API, imports.

The bundle here holds a hand-built ONNX graph (no torch export, so these tests take ~1 s):
probability = sigmoid(w * known diagnoses of the patient + b), columns in vocabulary order. It is
written by the export's own `write_bundle` (self-test, file list, digest), so it proves itself the
same way; tests/test_faults_bundle.py alters it in every way a bundle can be altered."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leader_edge.bedside.encoding import INPUT_NAMES, Encoder
from leader_edge.errors import DataError
from leader_edge.bedside.manifest import BUNDLE_FORMAT
from leader_edge.bedside.runtime import Bundle
from leader_edge.bedside.visit_stream import read_patients

MEDS = ["M1", "M2", "M3", "M4", "M5", "M6"]
ENCODER = Encoder({"diagnosis": ["D1", "D2", "D3", "D4", "D5"], "procedure": ["P1", "P2"], "medication": MEDS},
                  {"insurance": ["Medicare", "Private"]})
HEADER = "patient_id,visit_id,visit_time,diagnoses,procedures,medications,profile_insurance\n"


def write_fake_model(path: Path, *, bias: float = 1.0, sizes: dict | None = None, m: int = len(MEDS)) -> Path:
    """The fake model: sigmoid(w * known diagnoses + b * `bias`) ([B, m]); `bias=nan` outputs NaN.
    `sizes`: the table sizes stamped in its metadata (default: ENCODER's)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dims = {"diagnoses": ["B", "K", "Ld"], "procedures": ["B", "K", "Lp"], "medications": ["B", "K", "Lm"],
            "profile": ["B", 1], "visit_mask": ["B", "K"]}
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, dims[n]) for n in INPUT_NAMES]
    nodes = [
        helper.make_node("GreaterOrEqual", ["diagnoses", "zero"], ["known"]),
        helper.make_node("Cast", ["known"], ["known_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["known_f", "axes"], ["count"], keepdims=0),  # [B]
        helper.make_node("Unsqueeze", ["count", "one"], ["count2"]),  # [B, 1]
        helper.make_node("Mul", ["count2", "w"], ["scaled"]),
        helper.make_node("Add", ["scaled", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["probabilities"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        numpy_helper.from_array(np.linspace(-0.5, 1.0, m, dtype=np.float32)[None], "w"),
        numpy_helper.from_array(np.linspace(-2.0, 1.0, m, dtype=np.float32)[None] * np.float32(bias), "b"),
    ]
    graph = helper.make_graph(nodes, "fake", inputs, [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["B", m])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # onnxruntime 1.32 reads IR <= 11; 9 is the opset-18 era default
    sizes = sizes if sizes is not None else {"n_codes": ENCODER.n_codes, "n_meds": m, "n_profile_ids": ENCODER.n_profile_ids, "max_visits": 8}
    helper.set_model_props(model, {f"leader_edge.{k}": str(v) for k, v in sizes.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_fake_bundle(directory: Path, *, key=None, max_codes: int | None = None) -> Path:
    """A valid bundle of the fake model, written by the export's `write_bundle` (signed with `key`,
    an Ed25519 private key, if given; `max_codes`: the encoder's per-visit limit, default ENCODER's)."""
    from leader_edge.export.bundle import write_bundle

    encoder = ENCODER if max_codes is None else Encoder.from_json({**ENCODER.to_json(), "max_codes": max_codes})
    manifest = {"format_version": BUNDLE_FORMAT, "model": {"file": "model.onnx", "variant": "fp32"}, "threshold": 0.5,
                "encoder": encoder.to_json(), "profile_fields": ["insurance"], "ddi_pairs": [["M5", "M6"]],
                "selftest": {"file": "selftest.json", "patients": 6, "atol": 1e-4}}
    directory.mkdir(parents=True, exist_ok=True)
    write_bundle(directory, write_fake_model(directory / "model.onnx"), manifest, encoder, key=key)
    return directory


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    return Bundle.load(write_fake_bundle(tmp_path_factory.mktemp("bundle")))


def _chunks(text: str, chunk_patients: int = 100) -> list:
    return list(read_patients(io.BytesIO(text.encode()), "visits.csv", chunk_patients=chunk_patients))


def test_runtime_bundle_predicts_last_visit_from_known_codes(bundle):
    text = HEADER + "p1,v1,2100-01-01,D1;D2,P1,M1,Private\np1,v2,2100-02-01,D1;X9,,M2,Private\np2,v3,2100-01-01,D1;D2;D3,,,\n"
    (chunk,) = _chunks(text)
    scored = bundle.predict(chunk)
    assert scored.visit_ids == ["v2", "v3"]
    assert scored.unknown.tolist() == [1, 0]  # X9 is not in the vocabulary
    w, b = np.linspace(-0.5, 1.0, 6), np.linspace(-2.0, 1.0, 6)
    expected = 1 / (1 + np.exp(-(np.outer([3, 3], w) + b)))  # p1 sees D1;D2 (history) + D1 (current)
    np.testing.assert_allclose(scored.y_prob, expected, rtol=1e-5)
    every = bundle.predict(chunk, all_visits=True)
    assert every.visit_ids == ["v1", "v2", "v3"]


def test_runtime_sorted_batches_return_input_order(bundle):
    rows = [f"p{i},v{i},2100-01-01,{';'.join(['D1', 'D2', 'D3', 'D4', 'D5'][: i % 5 + 1])},,,\n" for i in range(23)]
    (chunk,) = _chunks(HEADER + "".join(rows))
    one = bundle.predict(chunk, batch_size=len(chunk))
    small = bundle.predict(chunk, batch_size=4)
    np.testing.assert_allclose(one.y_prob, small.y_prob, rtol=1e-6)
    assert np.argsort(one.y_prob[:, -1]).tolist() != list(range(23))  # rows genuinely differ


@pytest.mark.parametrize("threads", [2, 3])
def test_runtime_scoring_threads_change_nothing_but_the_schedule(threads, tmp_path):
    """Batches scored side by side come back in input order with exactly the one-thread
    probabilities: the batch plan depends on the data and the batch size, not on the threads."""
    rows = [f"p{i},v{i},2100-01-01,{';'.join(['D1', 'D2', 'D3', 'D4', 'D5'][: i % 5 + 1])},,,\n" for i in range(41)]
    (chunk,) = _chunks(HEADER + "".join(rows))
    d = write_fake_bundle(tmp_path / "b")
    one, many = Bundle.load(d, threads=1), Bundle.load(d, threads=threads)
    assert (one.workers, many.workers) == (1, threads)
    class Recorder:  # each batch the session scores, as its current visits' codes
        def __init__(self, session) -> None:
            self.session, self.plan = session, []

        def run(self, outputs, feed):
            self.plan.append(sorted(map(tuple, feed["diagnoses"][:, -1].tolist())))
            return self.session.run(outputs, feed)

    plans = {}
    for bundle in (one, many):  # the fake graph is exactly batch-invariant: compare the batches themselves
        bundle.session = Recorder(bundle.session)
        plans[bundle] = bundle.session.plan
    for batch_size in (4, 1024):  # many batches side by side; one batch on one thread
        want, got = one.predict(chunk, batch_size=batch_size), many.predict(chunk, batch_size=batch_size)
        assert got.visit_ids == want.visit_ids
        np.testing.assert_array_equal(got.y_prob, want.y_prob)
        np.testing.assert_array_equal(got.unknown, want.unknown)
    assert len(plans[one]) == 11 + 1 and sorted(plans[many]) == sorted(plans[one])  # the same batches
    assert Bundle.load(d, threads=0).workers >= 1  # one per usable CPU
    assert Bundle.load(d, threads=threads, split="operators").workers == 1  # serve: one batch, operator threads
    with pytest.raises(ValueError, match="split='rows'"):
        Bundle.load(d, split="rows")


def test_runtime_bundle_sha256_mismatch_refused(tmp_path):
    d = write_fake_bundle(tmp_path / "b")
    data = bytearray((d / "model.onnx").read_bytes())
    data[-1] ^= 1  # same size, one bit flipped
    (d / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"model.onnx: has sha256 .*field 'files.model.onnx.sha256'"):
        Bundle.load(d)


def test_runtime_not_a_bundle_refused(tmp_path):
    with pytest.raises(DataError, match="not a leader-edge bundle"):
        Bundle.load(tmp_path)
    d = write_fake_bundle(tmp_path / "b")
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(DataError, match="field 'format_version' is 99"):
        Bundle.load(d)


def test_runtime_bundle_self_test_reproduced_exactly(tmp_path):
    d = write_fake_bundle(tmp_path / "b")
    bundle = Bundle.load(d)
    assert bundle.self_test() == 0.0  # same machine, same runtime: the recorded probabilities exactly
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "model.onnx", "selftest.json"]
    assert set(bundle.manifest["files"]) == {"model.onnx", "selftest.json"}


def test_runtime_imports_no_torch(tmp_path):
    d = write_fake_bundle(tmp_path / "b")
    code = (
        "import sys, io\n"
        "import leader_edge.cli.predict\n"
        "import leader_edge.bedside.predict_file\n"
        "from leader_edge.bedside.runtime import Bundle\n"
        "from leader_edge.bedside.visit_stream import read_patients\n"
        f"b = Bundle.load({str(d)!r})\n"
        f"chunk, = read_patients(io.BytesIO({(HEADER + 'p1,v1,2100-01-01,D1,,,' + chr(10)).encode()!r}), 'x')\n"
        "b.predict(chunk)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'sklearn', 'pandas'))\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _records(text: str) -> list[list[dict]]:
    """A visits CSV as in-memory patients: lists of visit dicts, codes as lists."""
    import csv

    patients: dict[str, list[dict]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        patients.setdefault(row["patient_id"], []).append(
            {**{k: row[k] for k in ("patient_id", "visit_id", "visit_time")},
             **{k: row[k].split(";") if row[k] else [] for k in ("diagnoses", "procedures", "medications")},
             "profile": {"insurance": row["profile_insurance"]}})
    return list(patients.values())


@pytest.mark.parametrize("options", [{}, {"all_visits": True, "top_k": 2}, {"threshold": 0.9}])
def test_runtime_recommend_equals_predict_jsonl(bundle, tmp_path, options):
    from leader_edge.bedside.predict_file import predict_file

    text = HEADER + ("p1,v1,2100-01-01,D1;D2,P1,M1,Private\np1,v2,2100-02-01T08:00:00,D1;X9,,,Private\n"
                     "p2,v3,2100-01-01,D1;D2;D3,P2,M5,Medicare\np3,v4,2100-01-01,,,,\n")
    (tmp_path / "v.csv").write_text(text)
    predict_file(bundle, str(tmp_path / "v.csv"), str(tmp_path / "r.jsonl"), fmt="jsonl", **options)
    written = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    got = bundle.recommend(_records(text), **options)
    assert got == written and len(got) == (4 if options.get("all_visits") else 3)
    assert got[0]["unknown_codes"] == (0 if options.get("all_visits") else 1)


@pytest.mark.parametrize("change, line, column, message", [
    ({"visit_time": "2099-12-31"}, 3, "visit_time", "earlier than the patient's previous visit"),
    ({"visit_time": "01/02/2100"}, 3, "visit_time", "ISO 8601"),
    ({"diagnoses": ["D1", "D2;D3"]}, 3, "diagnoses", "contains ';'"),
    ({"diagnoses": ["D1", ""]}, 3, "diagnoses", "empty element"),
    ({"diagnoses": ["D 1"]}, 3, "diagnoses", "whitespace"),
    ({"visit_id": "v1"}, 3, "visit_id", "already used on line 2"),
    ({"visit_id": "=cmd()"}, 3, "visit_id", "formula"),
    ({"patient_id": "p2"}, 3, "patient_id", "differs from 'p1'"),
    ({"visit_id": None}, 3, "visit_id", "not text"),
])
def test_runtime_recommend_refuses_what_the_reader_refuses(bundle, change, line, column, message):
    patients = _records(HEADER + "p1,v1,2100-01-01,D1,,,Private\np1,v2,2100-02-01,D2,,,Private\np2,v3,2100-01-01,D1,,,\n")
    patients[0][1].update(change)
    with pytest.raises(DataError, match=message) as e:
        bundle.recommend(patients)
    assert (e.value.path, e.value.line, e.value.column) == ("request", line, column) and e.value.fix


def test_runtime_recommend_refuses_empty_and_split_patients(bundle):
    visit = {"patient_id": "p1", "visit_id": "v1", "visit_time": "2100-01-01"}
    with pytest.raises(DataError, match="no patients"):
        bundle.recommend([])
    with pytest.raises(DataError, match="patient 2 of the list has no visits"):
        bundle.recommend([[visit], []])
    with pytest.raises(DataError, match="also the previous patient's"):
        bundle.recommend([[visit], [{**visit, "visit_id": "v2", "visit_time": "2100-01-02"}]])
    (one,) = bundle.recommend([[visit]])  # no codes, no profile: scored on the bias alone
    assert one["visit_id"] == "v1" and one["unknown_codes"] == 0


def test_runtime_recommend_takes_dataset_visits(bundle):
    from datetime import datetime

    from leader_edge.data.dataset import Visit

    visits = [Visit("p1", "v1", datetime(2100, 1, 1), ("D1", "D2"), ("P1",), ("M1",), (("insurance", "Private"),)),
              Visit("p1", "v2", datetime(2100, 2, 1, 8), ("D1", "X9"), (), (), (("insurance", "Private"),))]
    as_dicts = [{"patient_id": v.patient_id, "visit_id": v.visit_id, "visit_time": v.time.isoformat(),
                 "diagnoses": list(v.diagnoses), "procedures": list(v.procedures), "medications": list(v.medications),
                 "profile": dict(v.profile)} for v in visits]
    got = bundle.recommend([visits], all_visits=True)
    assert got == bundle.recommend([as_dicts], all_visits=True) and [r["visit_id"] for r in got] == ["v1", "v2"]
    assert got[1]["unknown_codes"] == 1  # X9
