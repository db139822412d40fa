"""torch -> ONNX: the student is exported as written (no patched kernels, no swapped methods; the
traced copy is `Student.for_export`, the same function) and onnxruntime equals eager torch on other shapes than the traced ones, empty visits and padding
included, for the probability graph and the explanation graph (`Student.logit_parts`)."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from leader_edge.bedside.encoding import INPUT_NAMES
from leader_edge.export import onnx as onnx_export
from leader_edge.export.onnx import EXPLAIN_OUTPUTS, example_inputs, export_onnx
from leader_edge.train.student import Student, StudentConfig

N_CODES, N_MEDS, N_PROFILE, MED_OFFSET = 20, 6, 4, 14


def student(**kw) -> Student:
    """Every weight random (the wide table and prior too), so no term hides behind zeros."""
    torch.manual_seed(0)
    m = Student(StudentConfig(N_CODES, N_MEDS, N_PROFILE, MED_OFFSET, n_groups=3, dropout=0.0, **kw)).eval()
    rng = np.random.default_rng(0)
    m.set_code_groups(rng.integers(0, 3, N_CODES))
    if m.config.prior != "none":
        weight = (rng.random(N_CODES) < 0.7) * rng.uniform(0.5, 2.0, N_CODES)  # some codes unseen by the baseline
        m.set_prior(rng.uniform(0.01, 0.9, (N_CODES, N_MEDS)), weight, rng.uniform(0.05, 0.5, N_MEDS), 0.7)
    with torch.no_grad():
        if m.wide_codes is not None:
            m.wide_codes.normal_(0, 0.5)
        if m.config.prior_rule == "stack" and m.config.prior != "none":
            m.prior_mix.copy_(torch.tensor([0.7, 1.3, 0.1, 0.6]))
    return m


def odd_batch() -> dict[str, np.ndarray]:
    """Other sizes than the traced batch on every dynamic axis, a patient whose current visit has no
    code, one with a single visit, and ragged padding."""
    x = example_inputs(N_CODES, N_PROFILE, 1, batch=5, visits=3, widths=(2, 6, 1), seed=1)
    for name in INPUT_NAMES[:3]:
        x[name][1, -1] = -1
    x["diagnoses"][3, -1, 0] = -1
    x["visit_mask"][2] = [0, 0, 1]
    return x


# One student per row covers every option: wide max/mean/low-rank/none, each prior rule in the
# stack, set encoders mean and transformer (each export costs ~20 s on the shared VM).
VARIANTS = {
    "max+stack+mean": dict(wide="max", prior="frequency", prior_rule="stack", set_encoder="mean"),
    "mean-lowrank+stack+transformer": dict(wide="mean", wide_rank=3, prior="frequency", prior_rule="stack"),
    "max-lowrank+transformer": dict(wide="max", wide_rank=3, set_encoder="transformer"),
    "none+noisy_or+mean": dict(wide="none", prior="frequency", prior_rule="noisy_or", set_encoder="mean"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_onnx_student_as_written_equals_eager(variant, tmp_path):
    model = student(**VARIANTS[variant])
    methods = dict(vars(model)), dict(vars(model.visit_block))
    proba = export_onnx(model, tmp_path / "m.onnx", example_inputs(N_CODES, N_PROFILE, 1))
    explain = export_onnx(model, tmp_path / "e.onnx", example_inputs(N_CODES, N_PROFILE, 1), graph="explain")
    assert (dict(vars(model)), dict(vars(model.visit_block))) == methods  # nothing swapped on the instance
    x = odd_batch()
    args = [torch.from_numpy(x[n]) for n in INPUT_NAMES]
    with torch.no_grad():
        want_p = model.predict_proba(*args).numpy()
        want = model.logit_parts(*args)
        logits = model.logits(*args).numpy()
    got_p = ort.InferenceSession(str(proba), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(got_p, want_p, atol=2e-6, rtol=0)
    session = ort.InferenceSession(str(explain), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(EXPLAIN_OUTPUTS)
    got = dict(zip(EXPLAIN_OUTPUTS, session.run(None, x)))
    for name in EXPLAIN_OUTPUTS:
        assert got[name].dtype == want[name].numpy().dtype, name
        np.testing.assert_allclose(got[name], want[name].numpy(), atol=1e-5, rtol=0, err_msg=name)
    total = got["deep"] + got["wide"] + got["codes"].sum(1) + got["rest"]
    np.testing.assert_allclose(total, logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(1 / (1 + np.exp(-total)), got_p, atol=1e-6, rtol=0)
    assert not got["codes"][1].any()  # the visit with no code owns no share
    assert (got["wide_slot"][1] == -1).all()
    empty = {n: v.copy() for n, v in x.items()}  # no patient's current visit has a code: one padding column
    for name in INPUT_NAMES[:3]:
        empty[name][:, -1] = -1
    with torch.no_grad():
        want_p = model.predict_proba(*(torch.from_numpy(empty[n]) for n in INPUT_NAMES)).numpy()
    np.testing.assert_allclose(ort.InferenceSession(str(proba), providers=["CPUExecutionProvider"]).run(None, empty)[0],
                               want_p, atol=2e-6, rtol=0)


def test_export_onnx_refuses_triton_backend_and_unknown_graph(tmp_path):
    with pytest.raises(ValueError, match="backend='auto' or 'torch'"):
        export_onnx(student(backend="triton"), tmp_path / "m.onnx", example_inputs(N_CODES, N_PROFILE, 1))
    with pytest.raises(ValueError, match="graph='logits'"):
        export_onnx(student(), tmp_path / "m.onnx", example_inputs(N_CODES, N_PROFILE, 1), graph="logits")
    assert not hasattr(onnx_export, "mock")  # the exporter patches nothing


def test_quantize_weights_int8_takes_a_table_also_read_elementwise(tmp_path):
    """A table read by a Gather and by elementwise ops (the prior's rows and its log table) is
    quantised per row; one read only elementwise has no scale axis and stays fp32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    table, other = rng.uniform(0.01, 0.9, (100, 64)).astype(np.float32), rng.normal(size=(100, 64)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
             helper.make_node("Neg", ["table"], ["neg"]), helper.make_node("Log", ["other"], ["log"]),
             helper.make_node("Gather", ["neg", "ids"], ["neg_rows"], axis=0),
             helper.make_node("Gather", ["log", "ids"], ["log_rows"], axis=0)]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("rows", "neg_rows", "log_rows")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])], outputs,
                              [numpy_helper.from_array(table, "table"), numpy_helper.from_array(other, "other")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "f.onnx"))
    onnx_export.quantize_weights_int8(tmp_path / "f.onnx", tmp_path / "q.onnx")
    names = {i.name for i in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    assert {"table_int8", "table_scale", "other"} <= names and "table" not in names and "other_int8" not in names
    ids = np.array([0, 5, 99])
    rows, neg_rows, _ = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})
    np.testing.assert_allclose(rows, table[ids], atol=0.9 / 127)  # within a step of the row's scale
    np.testing.assert_array_equal(neg_rows, -rows)
