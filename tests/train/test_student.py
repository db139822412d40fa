"""LEADER(S) model: shapes, loss terms, padding invariance, NaN-free empty sets, visit order, size."""

import numpy as np
import pytest
import torch

from leader_edge.bedside.encoding import INPUT_NAMES, Encoder, RawVisit
from leader_edge.train.student import PRIOR_RULES, Student, StudentConfig, packed_codes
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
    assert m.n_params() < model(enc, set_encoder="transformer").n_params()  # no per-code attention
    # The pooled set vector is the mean of (code + group) embeddings, fed to the set MLP.
    codes = torch.tensor([[enc.med_offset, enc.med_offset + 2, -1]])
    rows = m.code_emb[codes[0, :2]] + m.group_emb[m.code_group[codes[0, :2]]]
    torch.testing.assert_close(m.encode_sets(codes, "med"), m.set_blocks["med"](rows.mean(0, keepdim=True)))
    with pytest.raises(ValueError, match="set_encoder"):
        StudentConfig(10, 3, 2, 7, set_encoder="gru")


def test_student_visit_block_last_equals_full_block_last_position():
    m = model(encoder(), dropout=0.0)
    x = torch.randn(5, 3, 3 * m.config.dim)
    mask = torch.tensor([[True, True, True], [False, True, True], [False, False, True], [True, True, True], [False, False, True]])
    got = m.visit_block(x, mask, last=True)
    assert got.shape == (5, 1, 3 * m.config.dim)
    torch.testing.assert_close(got, m.visit_block(x, mask)[:, -1:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_student_bag_is_the_reference_on_cpu_and_the_kernel_with_triton(mode, monkeypatch):
    from leader_edge import kernels
    from leader_edge.train import student as student_module

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(11, 5, generator=g)
    codes = torch.randint(0, 11, (7, 6), generator=g)
    codes[codes % 3 == 0] = -1  # ragged padding
    codes[2] = -1  # an empty bag: a zero row
    m = model(encoder())
    got = m.bag(weight, codes, mode)
    assert torch.equal(got, kernels.reference.embedding_bag(weight, codes, mode)) and not got[2].any()
    calls = []
    monkeypatch.setattr(student_module.kernels, "embedding_bag", lambda *a, **kw: calls.append(kw["backend"]) or got)
    m.bag(weight, codes, mode)
    assert calls == []  # CPU with backend "auto": the padded gather, traceable as it is
    model(encoder(), backend="triton").bag(weight, codes, mode)
    assert calls == ["triton"]


def with_prior(m: Student, seed: int = 0) -> Student:
    """Random counting-prior tables (some codes unseen), mixing weights and wide rows."""
    rng = np.random.default_rng(seed)
    n, k = m.config.n_codes, m.config.n_meds
    if m.config.prior != "none":
        m.set_prior(rng.uniform(0.01, 0.95, (n, k)), (rng.random(n) < 0.7) * rng.uniform(0.5, 2.0, n),
                    rng.uniform(0.02, 0.6, k), 0.7)
    with torch.no_grad():
        if m.wide_codes is not None:
            m.wide_codes.normal_(0, 0.5)
        if m.config.prior != "none" and m.config.prior_rule == "stack":
            m.prior_mix.copy_(torch.tensor([0.7, 1.3, -0.2, 0.6]))
    return m


WIDE = {"max": dict(wide="max"), "mean": dict(wide="mean"), "max-lowrank": dict(wide="max", wide_rank=2),
        "mean-lowrank": dict(wide="mean", wide_rank=2), "none": dict(wide="none")}
PRIOR = {"none": dict(prior="none"), **{r: dict(prior="frequency", prior_rule=r) for r in ("mean", "max", "noisy_or", "specificity", "stack")}}


@pytest.mark.parametrize("prior", list(PRIOR))
@pytest.mark.parametrize("wide", list(WIDE))
def test_student_logit_parts_add_up_to_logits(wide, prior):
    enc = encoder()
    m = with_prior(model(enc, **WIDE[wide], **PRIOR[prior]))
    b = tensors(enc.encode(PATIENTS))
    with torch.no_grad():
        parts = m.logit_parts(**b)
        logits = m.logits(**b)
    n_slots = sum(b[k].shape[2] for k in ("diagnoses", "procedures", "medications"))
    assert parts["codes"].shape == (3, n_slots, enc.n_meds) and parts["wide_slot"].dtype == torch.int64
    total = parts["deep"] + parts["wide"] + parts["codes"].sum(1) + parts["rest"]
    torch.testing.assert_close(total, logits, atol=1e-5, rtol=0)  # the contract's tolerance (|logit| <= ~20)
    h, _ = m.hidden_state(**b)
    torch.testing.assert_close(parts["deep"], h @ m.head_weight.T + m.head_bias)
    padding = torch.cat([b["diagnoses"][:, -1], b["procedures"][:, -1], b["medications"][:, -1]], 1) < 0
    assert not parts["codes"][padding].any()  # padding slots own nothing
    if wide != "max" and wide != "max-lowrank":
        assert (parts["wide_slot"] == -1).all() and not parts["wide"].any()
    if prior == "none" and not wide.startswith("mean"):
        assert not parts["codes"].any() and not parts["rest"].any()


@pytest.mark.parametrize("wide", ["max", "max-lowrank"])
def test_student_wide_slot_names_the_code_whose_row_is_the_wide_value(wide):
    enc = encoder()
    m = with_prior(model(enc, **WIDE[wide]))
    b = tensors(enc.encode(PATIENTS))
    with torch.no_grad():
        parts = m.logit_parts(**b)
        codes = torch.cat([b["diagnoses"][:, -1], b["procedures"][:, -1], b["medications"][:, -1]], 1)  # [B, L]
        table = m.wide_codes if m.wide_meds is None else m.wide_codes @ m.wide_meds  # [V, M]
    slot = parts["wide_slot"]
    assert (slot >= 0).all()  # every patient's current visit has a code
    code = codes.gather(1, slot)  # [B, M] the winning code of each medication
    assert (code >= 0).all()  # padding never wins
    won = table[code, torch.arange(enc.n_meds)]
    torch.testing.assert_close(won, parts["wide"])
    torch.testing.assert_close(parts["wide"], m.wide_logits(b["diagnoses"], b["procedures"], b["medications"]))


def test_student_prior_shares_follow_each_codes_row():
    """mean rule: a seen code above P(med) pushes the logit up, below pulls it down; max rule: the
    winning code owns the whole move from the global row's logit."""
    enc = encoder()
    b = tensors(enc.encode(PATIENTS))
    codes = torch.cat([b["diagnoses"][:, -1], b["procedures"][:, -1], b["medications"][:, -1]], 1)
    m = with_prior(model(enc, wide="none", prior="frequency", prior_rule="mean"))
    with torch.no_grad():
        m.prior_weight.fill_(1.0)  # every code seen
        shares = m.logit_parts(**b)["codes"]
    rows = m.prior_table[codes.clamp(min=0)] - m.prior_global  # [B, L, M]
    real = (codes >= 0)[..., None].expand_as(rows)
    assert (torch.sign(shares[real]) == torch.sign(rows[real])).all()
    m = with_prior(model(enc, wide="none", prior="frequency", prior_rule="max"))
    with torch.no_grad():
        parts = m.logit_parts(**b)
    g = m.prior_global.clamp(1e-4, 1 - 1e-4)
    torch.testing.assert_close(parts["rest"], (g.log() - (-g).log1p()).expand_as(parts["rest"]), atol=1e-5, rtol=0)
    assert ((parts["codes"] != 0).sum(1) <= 1).all()  # at most one owner per medication


def test_packed_codes_keeps_each_rows_codes_in_order_and_drops_only_padding():
    codes = torch.tensor([[-1, 5, -1, 2, 7, -1], [3, -1, -1, -1, -1, -1], [-1] * 6, [1, 2, 3, 4, -1, 6]])
    packed = packed_codes(codes)
    assert packed.shape == (4, 5)  # the fullest row holds 5 codes
    assert packed.tolist() == [[5, 2, 7, -1, -1], [3, -1, -1, -1, -1], [-1] * 5, [1, 2, 3, 4, 6]]
    assert packed_codes(torch.full((2, 3), -1)).shape == (2, 1)  # all padding: one padding column


@pytest.mark.parametrize("seed", [0, 1])
def test_student_rule_logits_are_each_rules_logits_over_unseen_codes_and_padding(seed):
    """The one-pass prior (`rule_logits`, what logits and model.onnx run) equals the per-rule form
    (`_rule`, what the explanation splits) for every rule: codes the baseline never saw, padding
    anywhere in the row, repeated codes and rows with no code at all."""
    torch.manual_seed(seed)
    m = Student(StudentConfig(40, 9, 3, 30, prior="frequency", prior_rule="stack")).eval()
    with_prior(m, seed)
    assert (m.prior_weight == 0).any() and (m.prior_weight > 0).any()
    codes = torch.randint(0, 40, (64, 11))
    codes[torch.rand(64, 11) < 0.4] = -1
    codes[:3] = -1  # empty visits: the global row alone
    codes[3, :4] = 7  # one code four times
    with torch.no_grad():
        fast = m.rule_logits(codes)
        for rule, z in zip(PRIOR_RULES, fast):
            torch.testing.assert_close(z, m._rule(codes, rule, False)[0], atol=2e-6, rtol=1e-6)
            torch.testing.assert_close(z, m.rule_logits(packed_codes(codes))[PRIOR_RULES.index(rule)], atol=2e-6, rtol=1e-6)
        z = torch.stack(fast, -1)
        torch.testing.assert_close(m.mix_prior(fast), m.mix_prior(z), atol=1e-6, rtol=1e-6)


def test_student_for_export_folds_groups_into_codes_and_computes_the_same():
    enc = encoder()
    for kw in (dict(), dict(set_encoder="transformer")):
        m = with_prior(model(enc, prior="frequency", prior_rule="stack", **kw))
        with torch.no_grad():
            m.group_emb.normal_(0, 0.3)  # groups that matter
        folded = m.for_export()
        assert folded.config.n_groups == 0 and m.config.n_groups > 0 and not folded.training
        b = tensors(enc.encode(PATIENTS))
        with torch.no_grad():
            torch.testing.assert_close(folded.predict_proba(**b), m.predict_proba(**b), atol=1e-6, rtol=0)
            want, got = m.logit_parts(**b), folded.logit_parts(**b)
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0)
    m = with_prior(model(enc, prior="frequency", prior_rule="stack"))
    m.prior_table.data, m.wide_codes.data = m.prior_table.to(torch.bfloat16), m.wide_codes.data.to(torch.bfloat16)
    folded = m.for_export()  # tensors keep their dtypes: the same function, not an fp32 copy of it
    dtypes = {n: t.dtype for n, t in folded.state_dict().items() if n not in ("group_emb", "code_group")}
    assert dtypes == {n: t.dtype for n, t in m.state_dict().items() if n not in ("group_emb", "code_group")}
    assert dtypes["prior_table"] == dtypes["wide_codes"] == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(folded.predict_proba(**b), m.predict_proba(**b), atol=1e-6, rtol=0)
    plain = model(enc, prior="none")
    plain.config.n_groups = 0
    assert plain.for_export() is plain


def test_student_training_logits_are_the_eager_logits():
    enc = encoder()
    m = with_prior(model(enc, prior="frequency", prior_rule="stack"))
    b = enc.encode(PATIENTS)
    batch = {**tensors(b), "labels": torch.from_numpy(enc.multi_hot(PATIENTS))}
    with torch.no_grad():
        out = m(batch)
        torch.testing.assert_close(out["logits"], m.logits(**tensors(b)))
        rules = torch.randn(3, enc.n_meds, 4)  # out-of-fold rule logits replace the tables' prior
        h, _ = m.hidden_state(**tensors(b))
        want = m.logits(**tensors(b)) - m.logit_terms(h, torch.cat([batch[k][:, -1] for k in INPUT_NAMES[:3]], 1))["prior"]
        torch.testing.assert_close(m({**batch, "prior": rules})["logits"], want + (rules * m.prior_mix).sum(-1))


def test_student_log1p_and_expm1_keep_small_arguments_in_plain_ops():
    """The Kahan forms (what the explain graph's prior shares use) against float64, where plain
    log(1 + x) and exp(x) - 1 in float32 lose most digits of a small x."""
    from leader_edge.train.student import expm1, log1p

    x = torch.tensor([-0.5, -1e-3, -3e-7, 0.0, 2e-7, 1e-4, 0.3])
    want = torch.log1p(x.double())
    torch.testing.assert_close(log1p(x).double(), want, atol=0, rtol=2e-7)
    assert ((torch.log(1 + x).double() - want).abs() / want.abs().clamp(min=1e-30))[2] > 1e-3  # why they exist
    neg = x[x <= 0]
    torch.testing.assert_close(expm1(neg).double(), torch.expm1(neg.double()), atol=0, rtol=2e-7)


def test_student_config_of_an_older_saved_student_keeps_its_trained_behaviour():
    """Fields added after a student was saved take the value it was trained with, not today's default."""
    old = {"n_codes": 10, "n_meds": 3, "n_profile_ids": 2, "med_offset": 7}  # saved before set_encoder/prior existed
    c = StudentConfig.from_json(old)
    assert (c.set_encoder, c.prior, c.prior_rule) == ("transformer", "none", "max")
    assert StudentConfig(10, 3, 2, 7).set_encoder == "mean"  # today's default: the shipped recipe's
    from leader_edge.train.distill import DistillConfig

    assert (DistillConfig().alpha, DistillConfig().set_encoder, DistillConfig().prior) == (c.alpha, "mean", "frequency")
