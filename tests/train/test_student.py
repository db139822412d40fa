"""LEADER(S) model: shapes, loss terms, padding invariance, NaN-free empty sets, visit order, size."""

import numpy as np
import pytest
import torch

from leader_edge.encoding import INPUT_NAMES, Encoder, RawVisit
from leader_edge.train.student import Student, StudentConfig

VOCAB = {"diagnosis": ["4280", "4281", "486", "5849"], "procedure": ["3961", "9604"], "medication": ["A02B", "B01A", "C07A"]}


def encoder() -> Encoder:
    return Encoder(VOCAB, {"sex": ["F", "M"]})


def model(enc: Encoder, **kw) -> Student:
    torch.manual_seed(0)
    groups = enc.code_groups()
    m = Student(StudentConfig(enc.n_codes, enc.n_meds, enc.n_profile_ids, enc.med_offset, n_groups=int(groups.max()) + 1, **kw))
    m.set_code_groups(groups)
    return m.eval()


PATIENTS = [
    [RawVisit(["4280"], ["3961"], ["A02B"], {"sex": "F"}), RawVisit(["486", "4281"], [], ["B01A"], {"sex": "F"})],
    [RawVisit(["5849"], [], ["C07A"], {"sex": "M"})],
    [RawVisit(["unknown"], ["9604"], [], {})],  # only unknown diagnoses: an all-padding set
]


def tensors(batch) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in batch.inputs().items()}


def test_student_forward_returns_loss_probabilities_and_gradients():
    enc = encoder()
    m = model(enc, teacher_dim=8).train()
    b = enc.encode(PATIENTS)
    batch = {**tensors(b), "labels": torch.from_numpy(enc.multi_hot(PATIENTS)),
             "target_medications": torch.from_numpy(b.target_medications), "teacher": torch.randn(3, 8)}
    out = m(batch)
    assert out["y_prob"].shape == (3, 3) and out["y_true"].shape == (3, 3)
    assert all(float(out[k]) > 0 for k in ("bce", "mse", "nce"))
    out["loss"].backward()
    assert m.code_emb.grad.abs().sum() > 0 and m.proj.weight.grad is not None


def test_student_predictions_ignore_padding_and_batch_company():
    enc = encoder()
    m = model(enc)
    b = enc.encode(PATIENTS)
    together = m.predict_proba(**tensors(b))
    alone = torch.cat([m.predict_proba(**tensors(enc.encode([p]))) for p in PATIENTS])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)
    assert torch.isfinite(together).all()
    torch.testing.assert_close(torch.sigmoid(m.logits(**tensors(b))), together)


def test_student_sees_visit_order():
    enc = encoder()
    m = model(enc)
    a, b, c = (RawVisit([d], [], [md], {"sex": "F"}) for d, md in (("4280", "A02B"), ("486", "B01A"), ("5849", "C07A")))
    p1 = m.predict_proba(**tensors(enc.encode([[a, b, c]])))
    p2 = m.predict_proba(**tensors(enc.encode([[b, a, c]])))
    assert (p1 - p2).abs().max() > 1e-5


def test_student_stays_under_one_million_inference_parameters_at_mimic_size():
    # MIMIC-III after the standard preprocessing: ~1,960 diagnoses, ~1,430 procedures, ~150 ATC-3 classes.
    cfg = StudentConfig(n_codes=1960 + 1430 + 150, n_meds=150, n_profile_ids=60, med_offset=3390, n_groups=900, teacher_dim=576)
    m = Student(cfg)
    assert m.n_params() <= 1_000_000
    assert m.n_params(inference=False) - m.n_params() == 128 * 576 + 576


def test_student_config_rejects_bad_values():
    with pytest.raises(ValueError, match="divisible"):
        StudentConfig(10, 3, 2, 7, dim=30, heads=4)
    with pytest.raises(ValueError, match="backend"):
        StudentConfig(10, 3, 2, 7, backend="cuda")


def test_student_code_groups_must_fit():
    enc = encoder()
    m = model(enc)
    with pytest.raises(ValueError, match="code groups"):
        m.set_code_groups(np.zeros(enc.n_codes + 1, dtype=np.int64))
