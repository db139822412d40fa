"""LEADER(S) model: shapes, loss terms, padding invariance, NaN-free empty sets, visit order, size."""

import numpy as np
import pytest
import torch

from leader_edge.encoding import INPUT_NAMES, Encoder, RawVisit
from leader_edge.train.student import Student, StudentConfig
from leader_edge.train.student_init import LOW_RANK

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
    # The full wide table (3,540 x 150 = 531k) does not fit beside the deep part; rank 64 does.
    cfg = StudentConfig(n_codes=1960 + 1430 + 150, n_meds=150, n_profile_ids=60, med_offset=3390, n_groups=900,
                        teacher_dim=576, wide_rank=LOW_RANK)
    m = Student(cfg)
    assert m.n_params() <= 1_000_000 < Student(StudentConfig(**{**cfg.to_json(), "wide_rank": 0})).n_params()
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


def test_student_wide_path_reduces_the_current_visit_code_rows():
    enc = encoder()
    b = tensors(enc.encode(PATIENTS))
    # Shared ids: diagnoses 0-3, procedures 4-5, medications 6-8. Current visits: 486, 4281 and the
    # previous visit's A02B; 5849; procedure 9604 alone.
    rows = ([2, 1, 6], [3], [5])
    for mode in ("max", "mean"):
        m = model(enc, wide=mode)
        with torch.no_grad():
            m.wide_codes.copy_(torch.randn(enc.n_codes, enc.n_meds))
        reduce = (lambda x: x.amax(0)) if mode == "max" else (lambda x: x.mean(0))
        expected = torch.stack([reduce(m.wide_codes[r]) for r in rows])
        torch.testing.assert_close(m.wide_logits(b["diagnoses"], b["procedures"], b["medications"]), expected)
        h, _ = m.hidden_state(**b)
        torch.testing.assert_close(m.logits(**b), h @ m.head_weight.T + m.head_bias + expected)


def test_student_wide_path_scores_zero_without_codes_and_low_rank_is_a_product():
    enc = encoder()
    m = model(enc, wide="max", wide_rank=2)
    with torch.no_grad():
        m.wide_codes.copy_(torch.randn(enc.n_codes, 2))
    codes = torch.tensor([[[-1, -1]], [[1, -1]]])  # [B=2, K=1, L=2]: no codes, one code
    empty = torch.full((2, 1, 1), -1)
    out = m.wide_logits(codes, empty, empty)
    assert torch.equal(out[0], torch.zeros(enc.n_meds))
    torch.testing.assert_close(out[1], m.wide_codes[1] @ m.wide_meds)
    with pytest.raises(ValueError, match="wide"):
        StudentConfig(10, 3, 2, 7, wide="sum")


def test_student_mean_set_encoder_is_padding_invariant_and_smaller():
    enc = encoder()
    m = model(enc, set_encoder="mean")
    b = enc.encode(PATIENTS)
    together = m.predict_proba(**tensors(b))
    alone = torch.cat([m.predict_proba(**tensors(enc.encode([p]))) for p in PATIENTS])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)
    assert torch.isfinite(together).all()
    assert m.n_params() < model(enc).n_params()  # no per-code attention
    # The pooled set vector is the mean of (code + group) embeddings, fed to the set MLP.
    codes = torch.tensor([[enc.med_offset, enc.med_offset + 2, -1]])
    rows = m.code_emb[codes[0, :2]] + m.group_emb[m.code_group[codes[0, :2]]]
    torch.testing.assert_close(m.encode_sets(codes, "med"), m.set_blocks["med"](rows.mean(0, keepdim=True)))
    with pytest.raises(ValueError, match="set_encoder"):
        StudentConfig(10, 3, 2, 7, set_encoder="gru")
