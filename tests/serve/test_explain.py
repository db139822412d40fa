"""Explanations: the logit's parts add up to the model's logit, the wide winner is the right code,
names come from names.json; in-process (`leader_edge.bedside.explain`) and over HTTP (`explain: true`).

The explain graph here is hand-built for the fake model of tests/test_runtime.py (logit = w * known
diagnoses in all kept visits + b), split as the contract asks: deep = b, wide = w for the current
visit's first known diagnosis (wide_slot 0), codes = w for each other current diagnosis, rest = w
per known diagnosis of earlier visits."""

import json
import math

import numpy as np
import pytest
from conftest import Server
from test_faults_bundle import write_manifest
from test_runtime import HEADER, MEDS, write_fake_bundle
from test_serve import P1, P2

from leader_edge.bedside.explain import Explainer
from leader_edge.bedside.runtime import Bundle
from leader_edge.serve.model import Job, Model
from leader_edge.serve.schema import PatientIn

NAMES = {"diagnosis": {"D1": "Heart failure", "D2": "Hypertension"}, "procedure": {}, "medication": {"M6": "Statins"}}


def write_fake_explain(path):
    """The fake model's explain graph (inputs as model.onnx; outputs deep, wide, wide_slot, codes, rest)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from leader_edge.bedside.encoding import INPUT_NAMES

    m = len(MEDS)
    dims = {"diagnoses": ["B", "K", "Ld"], "procedures": ["B", "K", "Lp"], "medications": ["B", "K", "Lm"],
            "profile": ["B", 1], "visit_mask": ["B", "K"]}
    n = helper.make_node
    nodes = [
        n("GreaterOrEqual", ["diagnoses", "zero"], ["known_b"]), n("Cast", ["known_b"], ["known"], to=TensorProto.FLOAT),
        n("Gather", ["known", "last"], ["cur"], axis=1),  # [B, Ld] the current visit
        n("ReduceSum", ["known", "axes12"], ["total"], keepdims=0), n("ReduceSum", ["cur", "axes1"], ["cur_total"], keepdims=0),
        n("Gather", ["cur", "first"], ["slot0"], axis=1),  # [B] 1 when the current visit has a known diagnosis
        n("Unsqueeze", ["slot0", "axes1"], ["slot0_2"]), n("Mul", ["slot0_2", "w"], ["wide"]),
        n("Sub", ["slot0_2", "one_f"], ["slot_f"]), n("Mul", ["slot_f", "ones_m"], ["slot_m"]),
        n("Cast", ["slot_m"], ["wide_slot"], to=TensorProto.INT64),
        n("Mul", ["cur", "zero_f"], ["cur0"]), n("Add", ["cur0", "one_f"], ["ones_l"]),
        n("CumSum", ["ones_l", "axis1"], ["pos1"]), n("Greater", ["pos1", "one_f"], ["later_b"]),
        n("Cast", ["later_b"], ["later"], to=TensorProto.FLOAT), n("Mul", ["cur", "later"], ["others"]),
        n("Unsqueeze", ["others", "axes2"], ["others3"]), n("Mul", ["others3", "w3"], ["codes_d"]),
        *[x for name in ("procedures", "medications") for x in (
            n("Gather", [name, "last"], [f"{name}_cur"], axis=1), n("Cast", [f"{name}_cur"], [f"{name}_f"], to=TensorProto.FLOAT),
            n("Mul", [f"{name}_f", "zero_f"], [f"{name}_0"]), n("Unsqueeze", [f"{name}_0", "axes2"], [f"{name}_3"]),
            n("Mul", [f"{name}_3", "w3"], [f"codes_{name}"]))],
        n("Concat", ["codes_d", "codes_procedures", "codes_medications"], ["codes"], axis=1),
        n("Mul", ["total", "zero_f"], ["total0"]), n("Unsqueeze", ["total0", "axes1"], ["total0_2"]),
        n("Add", ["total0_2", "b"], ["deep"]),
        n("Sub", ["total", "cur_total"], ["history"]), n("Unsqueeze", ["history", "axes1"], ["history2"]),
        n("Mul", ["history2", "w"], ["rest"]),
    ]
    f32 = lambda a: np.array(a, dtype=np.float32)  # noqa: E731
    i64 = lambda a: np.array(a, dtype=np.int64)  # noqa: E731
    w = np.linspace(-0.5, 1.0, m, dtype=np.float32)[None]
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "zero": i64(0), "last": i64(-1), "first": i64(0), "axes12": i64([1, 2]), "axes1": i64([1]), "axes2": i64([2]),
        "axis1": i64(1), "one_f": f32(1.0), "zero_f": f32(0.0), "ones_m": np.ones((1, m), np.float32), "w": w,
        "w3": w[None], "b": np.linspace(-2.0, 1.0, m, dtype=np.float32)[None]}.items()]
    inputs = [helper.make_tensor_value_info(k, TensorProto.INT64, dims[k]) for k in INPUT_NAMES]
    outputs = [helper.make_tensor_value_info("deep", TensorProto.FLOAT, ["B", m]),
               helper.make_tensor_value_info("wide", TensorProto.FLOAT, ["B", m]),
               helper.make_tensor_value_info("wide_slot", TensorProto.INT64, ["B", m]),
               helper.make_tensor_value_info("codes", TensorProto.FLOAT, ["B", "L", m]),
               helper.make_tensor_value_info("rest", TensorProto.FLOAT, ["B", m])]
    model = helper.make_model(helper.make_graph(nodes, "explain", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def explained_dir(tmp_path_factory):
    d = write_fake_bundle(tmp_path_factory.mktemp("explained"))
    write_fake_explain(d / "explain.onnx")
    (d / "names.json").write_text(json.dumps(NAMES))
    m = json.loads((d / "manifest.json").read_text())
    m["files"].update({"explain.onnx": {}, "names.json": {}})
    m["explain"], m["names"] = {"file": "explain.onnx"}, {"file": "names.json"}
    write_manifest(d, m, reseal=True)
    return d


def check_adds_up(explanation: dict, probability: float, atol: float = 1e-5) -> None:
    """sigmoid(the explanation's logit) is the model's probability (atol: 5e-5 for the answers'
    4-decimal scores). That its parts are the graph's: `test_explain_parts_are_the_graph_outputs`."""
    assert 1 / (1 + math.exp(-explanation["logit"])) == pytest.approx(probability, abs=atol)


def test_explain_parts_are_the_graph_outputs(explained_dir):
    """Each part of an explanation against the explain graph's raw outputs, computed here on their
    own: deep; the wide winner (the code at `wide_slot`, with wide + its codes share); every other
    listed code (the code at its slot, its share); rest (the graph's rest, unlisted shares, a winner-
    less wide); and the logit from the raw outputs is the model's."""
    from leader_edge.bedside.explain import MIN_SHARE

    p3 = {"patient_id": "p3", "visits": [{"visit_id": "v9", "visit_time": "2100-01-01", "diagnoses": ["X9"]}]}
    model = Model.load(explained_dir)
    explainer = model.explainer
    table = model._read([PatientIn.model_validate(p) for p in (P1, P2, p3)])
    batch = explainer.encoder.encode_table(table).batch(table.starts[1:] - 1)
    raw = explainer.parts(batch)
    current = np.concatenate([batch.diagnoses[:, -1], batch.procedures[:, -1], batch.medications[:, -1]], axis=1)
    why = explainer.explain(batch, [MEDS] * 3)
    prob = Bundle.load(explained_dir).predict(table).y_prob.astype(np.float64)
    logits = np.log(prob) - np.log1p(-prob)
    winners = 0
    for b in range(3):
        for m, med in enumerate(MEDS):
            e, share, slot, wide = why[b][med], raw["codes"][b, :, m], int(raw["wide_slot"][b, m]), float(raw["wide"][b, m])
            assert e["deep"] == pytest.approx(float(raw["deep"][b, m]), abs=1e-6)
            listed = [s for s in range(current.shape[1]) if current[b, s] >= 0 and (s == slot or abs(share[s]) >= MIN_SHARE)]
            want = [(explainer.codes[current[b, s]], s == slot, float(share[s]) + (wide if s == slot else 0.0)) for s in listed]
            got = [(c["code"], c["wide"], c["logit"]) for c in e["codes"]]
            assert sorted(got) == sorted((c, w, pytest.approx(x, abs=1e-6)) for c, w, x in want)
            unlisted = float(share.sum()) - sum(float(share[s]) for s in listed)
            winner = slot >= 0 and current[b, slot] >= 0
            winners += winner
            assert e["rest"] == pytest.approx(float(raw["rest"][b, m]) + unlisted + (0.0 if winner else wide), abs=1e-5)
            whole = float(raw["deep"][b, m]) + wide + float(share.sum()) + float(raw["rest"][b, m])
            assert whole == pytest.approx(float(logits[b, m]), abs=1e-4)
            assert e["logit"] == pytest.approx(whole, abs=1e-5)
    assert 0 < winners < 3 * len(MEDS)  # p3's current visit has no known code: no winner


def test_explain_parts_add_up_to_the_model_logit(explained_dir):
    model = Model.load(explained_dir)
    (records,) = model.score([Job([PatientIn.model_validate(p) for p in (P1, P2)], all_scores=True, explain=True)])
    bundle = Bundle.load(explained_dir)
    table = model._read([PatientIn.model_validate(p) for p in (P1, P2)])
    prob = bundle.predict(table).y_prob
    for row, record in enumerate(records):
        assert set(record["explanations"]) == set(record["medications"]) and record["medications"]
        for med, why in record["explanations"].items():
            check_adds_up(why, float(prob[row, MEDS.index(med)]))
    why = records[1]["explanations"]["M6"]  # p2: D1, D2, D3 in its only visit; M6 has w = 1.0
    assert why["deep"] == pytest.approx(1.0) and why["rest"] == pytest.approx(0.0)
    assert [(c["code"], c["name"], c["wide"], c["logit"]) for c in why["codes"]] == [
        ("D1", "Heart failure", True, pytest.approx(1.0)), ("D2", "Hypertension", False, pytest.approx(1.0)),
        ("D3", None, False, pytest.approx(1.0))]
    history = records[0]["explanations"][records[0]["medications"][0]]  # p1: D1, D2 before, D1 (and X9) now
    assert [c["code"] for c in history["codes"]] == ["D1"] and history["rest"] != 0


def test_serve_explain_is_bounded_and_one_pass_per_batch(explained_dir, monkeypatch):
    from leader_edge.serve import model as serve_model
    from leader_edge.serve.model import RequestError

    model = Model.load(explained_dir)
    p4 = {**P2, "patient_id": "p4", "visits": [{**P2["visits"][0], "visit_id": "v4", "diagnoses": ["D2"]}]}
    jobs = [Job([PatientIn.model_validate(P1)], explain=True), Job([PatientIn.model_validate(p4)]),
            Job([PatientIn.model_validate(P2)], explain=True, top_k=2, all_scores=True)]
    alone = [model.score([job])[0] for job in jobs]
    calls, explain_table = [], model.explainer.explain_table
    model.explainer.explain_table = lambda table, ends, *a, **k: calls.append(len(ends)) or explain_table(table, ends, *a, **k)
    assert model.score(jobs) == alone and calls == [2]  # one encoding for the batch, not one per explaining request

    monkeypatch.setattr(serve_model, "MAX_EXPLAINED", 2)
    monkeypatch.setattr(serve_model, "MAX_EXPLAIN_PATIENTS", 1)
    p2 = [PatientIn.model_validate(P2)]
    for job, field, words in [(Job(p2, explain=True, threshold=0.0), "threshold", "patients[0] gets 6 medications"),
                              (Job(p2, explain=True, top_k=3), "top_k", "at most 2"),
                              (Job([*p2, PatientIn.model_validate(P1)], explain=True), "patients", "limit is 1")]:
        (error,) = model.score([job])
        assert isinstance(error, RequestError) and error.field == field and words in error.message, error
        job.explain = False
        assert not isinstance(model.score([job])[0], RequestError)
    assert len(model.score([Job(p2, explain=True, top_k=2)])[0][0]["explanations"]) == 2


def test_explain_refuses_a_graph_with_other_outputs(explained_dir, tmp_path):
    import shutil

    d = tmp_path / "b"
    shutil.copytree(explained_dir, d)
    shutil.copy(d / "model.onnx", d / "explain.onnx")
    m = json.loads((d / "manifest.json").read_text())
    write_manifest(d, m, reseal=True)
    with pytest.raises(ValueError, match="explain graph gives"):
        Explainer(Bundle.load(d))


def test_serve_explain_over_http(explained_dir):
    server = Server(explained_dir)
    try:
        r = server.client.post("/v1/recommend", json={"patient": P2, "explain": True, "top_k": 2})
        assert r.status_code == 200, r.text
        (res,) = r.json()["results"]
        assert list(res["explanations"]) == res["medications"] == ["M6", "M5"]
        for med, why in res["explanations"].items():
            check_adds_up(why, res["scores"][med], atol=5e-5)
        assert res["explanations"]["M6"]["codes"][0] == {"code": "D1", "kind": "diagnosis", "name": "Heart failure",
                                                          "logit": pytest.approx(1.0), "wide": True}
        assert "explanations" not in server.client.post("/v1/recommend", json={"patient": P2}).json()["results"][0]
    finally:
        server.stop()


VISITS = HEADER + ("p1,v1,2100-01-01,D1;D2,P1,M1,Private\n"
                   "p1,v2,2100-02-01T08:00:00,D1;X9,,,Private\n"
                   "p2,v3,2100-01-01,D1;D2;D3,P2,M5,Medicare\n")


@pytest.mark.parametrize("extra", [(), ("--all-visits", "--top-k", "2")])
def test_predict_explain_jsonl(explained_dir, tmp_path, extra):
    from click.testing import CliRunner

    from leader_edge.cli import main

    (tmp_path / "visits.csv").write_text(VISITS)
    args = ["predict", "--bundle", str(explained_dir), "--input", str(tmp_path / "visits.csv"), "--format", "jsonl",
            "--explain", *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["visit_id"] for r in rows] == (["v1", "v2", "v3"] if extra else ["v2", "v3"])
    for row in rows:
        assert list(row["explanations"]) == row["medications"]
        for med, why in row["explanations"].items():
            check_adds_up(why, row["scores"][med], atol=5e-5)
    assert rows[-1]["explanations"]["M6"]["codes"][0]["name"] == "Heart failure"


def test_predict_explain_refused_without_jsonl_or_graph(explained_dir, bundle_dir, tmp_path):
    from click.testing import CliRunner

    from leader_edge.cli import main

    (tmp_path / "visits.csv").write_text(VISITS)
    base = ["predict", "--input", str(tmp_path / "visits.csv"), "--explain"]
    result = CliRunner().invoke(main, [*base, "--bundle", str(explained_dir)])
    assert result.exit_code == 2 and "--format jsonl" in result.output
    result = CliRunner().invoke(main, [*base, "--bundle", str(bundle_dir), "--format", "jsonl"])
    assert result.exit_code == 2 and "no field 'explain'" in result.output and "Traceback" not in result.output
