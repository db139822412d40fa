"""Padded-gather export forms equal the reference ops they replace, empty bags and rows included."""

import numpy as np
import pytest
import torch

from leader_edge.export import forms
from leader_edge.kernels import reference
from leader_edge.train.student import Student, StudentConfig


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_padded_embedding_bag_equals_reference(mode):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(11, 5, generator=g)
    codes = torch.randint(0, 11, (7, 6), generator=g)
    codes[codes % 3 == 0] = -1  # ragged padding
    codes[2] = -1  # an empty bag: a zero row in both
    got = forms.padded_embedding_bag(weight, codes, mode)
    assert torch.equal(got, reference.embedding_bag(weight, codes, mode))
    assert torch.equal(got[2], torch.zeros(5))


@pytest.mark.parametrize("wide,rank", [("max", 0), ("mean", 0), ("max", 3)])
def test_padded_wide_logits_equals_student(wide, rank):
    torch.manual_seed(0)
    model = Student(StudentConfig(20, 6, 4, 14, dropout=0.0, wide=wide, wide_rank=rank, set_encoder="mean", backend="torch"))
    with torch.no_grad():
        model.wide_codes.normal_()
    rng = np.random.default_rng(0)
    d, p, m = (torch.from_numpy(rng.integers(-1, 14, size=(5, 2, w))) for w in (4, 2, 3))
    d[1, -1], p[1, -1], m[1, -1] = -1, -1, -1  # a current visit with no codes scores 0
    want = model.wide_logits(d, p, m)
    got = forms.padded_wide_logits(model, d, p, m)
    assert torch.equal(got, want) and torch.equal(got[1], torch.zeros(6))


def test_last_query_forward_equals_block_last_position():
    torch.manual_seed(0)
    model = Student(StudentConfig(20, 6, 4, 14, dropout=0.0, set_encoder="mean", backend="torch")).eval()
    x = torch.randn(5, 3, 3 * model.config.dim)
    mask = torch.tensor([[True, True, True], [False, True, True], [False, False, True], [True, True, True], [False, False, True]])
    want = model.visit_block(x, mask)[:, -1:]
    got = forms.last_query_forward(model.visit_block, x, mask)
    assert got.shape == (5, 1, 3 * model.config.dim)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("wide,rank", [("max", 0), ("mean", 0), ("max", 3), ("none", 0)])
def test_export_onnx_every_wide_variant_matches_the_student(wide, rank, tmp_path):
    import onnxruntime as ort

    from leader_edge.encoding import INPUT_NAMES
    from leader_edge.export.onnx import example_inputs, export_onnx

    torch.manual_seed(0)
    model = Student(StudentConfig(20, 6, 4, 14, dropout=0.0, wide=wide, wide_rank=rank, set_encoder="mean", backend="torch")).eval()
    if model.wide_codes is not None:
        with torch.no_grad():
            model.wide_codes.normal_()
    path = export_onnx(model, tmp_path / "m.onnx", example_inputs(20, 4, 1))
    inputs = example_inputs(20, 4, 1, batch=5, visits=3, widths=(2, 6, 1), seed=1)  # other shapes than traced
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    with torch.no_grad():
        want = model.predict_proba(*(torch.from_numpy(inputs[n]) for n in INPUT_NAMES)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


# "stack" computes all four rules in one graph; "max" is the single-rule path (each export costs ~20 s)
@pytest.mark.parametrize("rule", ["max", "stack"])
def test_export_onnx_counting_prior_matches_the_student(rule, tmp_path):
    import onnxruntime as ort

    from leader_edge.encoding import INPUT_NAMES
    from leader_edge.export.onnx import example_inputs, export_onnx

    torch.manual_seed(0)
    model = Student(StudentConfig(20, 6, 4, 14, dropout=0.0, wide="max", set_encoder="mean", backend="torch",
                                  prior="frequency", prior_rule=rule)).eval()
    rng = np.random.default_rng(0)
    weight = (rng.random(20) < 0.7) * rng.uniform(0.5, 2.0, 20)  # some codes unseen by the baseline
    model.set_prior(rng.uniform(0.01, 0.9, (20, 6)), weight, rng.uniform(0.05, 0.5, 6), 0.7)
    with torch.no_grad():
        model.wide_codes.normal_(0, 0.3)
        if rule == "stack":
            model.prior_mix.copy_(torch.tensor([0.7, 1.3, 0.1, 0.6]))
    path = export_onnx(model, tmp_path / "m.onnx", example_inputs(20, 4, 1))
    inputs = example_inputs(20, 4, 1, batch=5, visits=3, widths=(2, 6, 1), seed=1)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    with torch.no_grad():
        want = model.predict_proba(*(torch.from_numpy(inputs[n]) for n in INPUT_NAMES)).numpy()
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
