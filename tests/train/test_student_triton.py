"""The student end to end on the kernels: backend="triton" (the CPU interpreter, or CUDA) equals
backend="torch" in forward, loss and every parameter's gradient, and in a distillation epoch."""

import os

# Read when the kernels are first decorated: set before anything here calls Triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LEADER_EDGE_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from leader_edge.bedside.encoding import INPUT_NAMES  # noqa: E402
from leader_edge.train.student import Student, StudentConfig  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
# (atol, rtol) by table dtype. fp32: summation order only. bf16 tables: the values read are the same
# bf16 numbers on both sides, but torch accumulates the wide table's gradient in bf16 (a rounding per
# add) and the kernel in fp32 (one rounding), so that gradient differs by a few bf16 ulps (0.4-0.8% each).
TOLERANCES = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 3e-2)}
V, MEDS, OFFSET, K, WIDTHS = 23, 11, 17, 2, (5, 3, 4)
# Every interpreted program costs ~10-20 ms and the bags launch one per (patient, visit): 5 patients
# x 2 slots keep a variant's three forwards and one backward at ~3 s on the 2-core VM.
B = 5
# The shipped student (distill.py defaults: mean set encoder, wide max, counting prior "stack"),
# then each head variant: the transformer set encoder, the wide fallbacks (mean, low rank), no wide path.
# Only the shipped one has code groups and InfoNCE (each costs more bag launches under the interpreter).
VARIANTS = {
    "shipped": dict(set_encoder="mean", wide="max", prior="frequency", prior_rule="stack", n_groups=4, info_nce=0.1),
    "transformer": dict(set_encoder="transformer", wide="max"),
    "wide-mean": dict(set_encoder="mean", wide="mean", prior="frequency", prior_rule="max"),
    "low-rank": dict(set_encoder="mean", wide="max", wide_rank=3, prior="frequency", prior_rule="noisy_or"),
    "linear": dict(set_encoder="mean", wide="none"),
}


def make_student(backend: str, device: str, tables: torch.dtype, *, ties: bool, **variant) -> Student:
    """A tiny student with random weights (the same for both backends), its wide and prior tables in
    `tables` dtype; `ties` rounds the wide table to halves so slots tie at the max, else it keeps
    its zero init (the shipped training start), where every slot ties."""
    torch.manual_seed(0)
    variant = {"n_groups": 0, "info_nce": 0.0, **variant}
    config = StudentConfig(V, MEDS, 5, OFFSET, dim=8, heads=2, hidden=12, max_visits=4, dropout=0.0,
                           teacher_dim=6, backend=backend, **variant)
    model = Student(config)
    if config.n_groups:
        model.set_code_groups(torch.arange(V) % config.n_groups)
    if config.prior != "none":
        model.set_prior(torch.rand(V, MEDS) * 0.5, (torch.arange(V) % 3).float(), torch.rand(MEDS) * 0.3, 0.69)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "wide_codes" and ties:
                p.copy_((torch.randn(p.shape) * 2).round() / 2)
            elif name != "wide_codes":
                p.add_(torch.randn(p.shape) * 0.1)  # zero-initialised terms (the deep head) move off 0
    if model.wide_codes is not None:
        model.wide_codes = torch.nn.Parameter(model.wide_codes.detach().to(tables))
    if config.prior != "none":
        model.prior_table = model.prior_table.to(tables)
    return model.to(device)


def make_batch(b: int, device: str, seed: int) -> dict[str, torch.Tensor]:
    """Odd shapes; patient 0 has one visit, and with b > 3 patient 1 an empty current visit,
    patient 2 one code repeated, patient 3 two visits."""
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, K, generator=gen) < 0.6).long()
    mask[:, -1] = 1
    mask[0, :-1] = 0
    if b > 3:
        mask[3, :] = 1
    mask = torch.sort(mask, dim=1, stable=True).values  # right-aligned visits
    batch = {"visit_mask": mask, "profile": torch.randint(-1, 5, (b, 2), generator=gen)}
    for name, width, (lo, hi) in zip(INPUT_NAMES[:3], WIDTHS, ((0, 12), (12, OFFSET), (OFFSET, V))):
        codes = torch.randint(lo, hi, (b, K, width), generator=gen)
        codes[(torch.rand(b, K, width, generator=gen) < 0.3) | (mask[..., None] == 0)] = -1
        if b > 3:
            codes[1, -1] = -1
            codes[2, -1] = codes[2, -1, 0]
        batch[name] = codes
    batch.update(labels=(torch.rand(b, MEDS, generator=gen) < 0.3).float(), teacher=torch.randn(b, 6, generator=gen),
                 target_medications=torch.randint(OFFSET, V, (b, 3), generator=gen), prior=torch.randn(b, MEDS, 4, generator=gen))
    return {k: v.to(device) for k, v in batch.items()}


def run(model: Student, batch: dict, *, ddi: bool = False, logits: bool = False) -> dict[str, torch.Tensor]:
    """Probabilities (and `logits`), the training loss and y_prob, and every parameter's gradient."""
    inputs = [batch[n] for n in INPUT_NAMES]
    out = {"proba": model.predict_proba(*inputs)}
    if logits:  # a third interpreted forward: only where asked
        out["logits"] = model.logits(*inputs)
    model.zero_grad(set_to_none=True)
    train = dict(batch) if model.config.prior_rule == "stack" else {k: v for k, v in batch.items() if k != "prior"}
    if ddi:
        train["ddi"] = (torch.rand(MEDS, MEDS, generator=torch.Generator().manual_seed(5)) < 0.2).to(batch["labels"])
    step = model.train()(train)
    step["loss"].backward()
    out.update(loss=step["loss"], bce=step["bce"], y_prob=step["y_prob"])
    out.update({f"grad {n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
    model.eval()
    return out


def assert_backends_agree(variant: dict, device: str, tables: torch.dtype, *, ties: bool = True, ddi: bool = False,
                          b: int = B, logits: bool = False) -> None:
    batch = make_batch(b, device, seed=b)
    want = run(make_student("torch", device, tables, ties=ties, **variant), batch, ddi=ddi, logits=logits)
    got = run(make_student("triton", device, tables, ties=ties, **variant), batch, ddi=ddi, logits=logits)
    assert set(got) == set(want), set(got) ^ set(want)
    atol, rtol = TOLERANCES[tables]
    for key in want:
        torch.testing.assert_close(got[key].float(), want[key].float(), atol=atol, rtol=rtol, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_student_triton_matches_torch(variant, device_param):
    assert_backends_agree(VARIANTS[variant], device_param, torch.float32, logits=variant == "shipped")


@pytest.mark.parametrize("ties", [True, False], ids=["halves", "zero-table"])
def test_student_triton_matches_torch_in_bf16(ties, device_param):
    # ties=False keeps the wide table at its zero init: every slot ties for every medication.
    assert_backends_agree(VARIANTS["shipped"], device_param, torch.bfloat16, ties=ties)


def test_student_triton_matches_torch_with_ddi_penalty_and_a_single_patient(device_param):
    # The DDI penalty needs differentiable probabilities: the head's logits form, not its loss form.
    assert_backends_agree({**VARIANTS["shipped"], "ddi_weight": 0.5}, device_param, torch.float32, ddi=True)
    assert_backends_agree(VARIANTS["shipped"], device_param, torch.float32, b=1)


def test_student_triton_logits_equal_the_sum_of_logit_parts(device_param):
    # logit_parts (the explain graph's terms) stays in torch; the fused logits must still be their sum.
    model = make_student("triton", device_param, torch.float32, ties=True, **VARIANTS["shipped"])
    inputs = [make_batch(B, device_param, seed=3)[n] for n in INPUT_NAMES]
    parts = model.logit_parts(*inputs)
    total = parts["deep"] + parts["wide"] + parts["codes"].sum(1) + parts["rest"]
    torch.testing.assert_close(model.logits(*inputs), total, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_student_out_of_range_code_fails_loudly_on_every_backend(backend, device_param):
    model = make_student(backend, device_param, torch.float32, ties=True, **VARIANTS["shipped"])
    batch = make_batch(B, device_param, seed=0)
    batch["diagnoses"][0, -1, 0] = V  # one past the table
    with pytest.raises((ValueError, IndexError), match="out of range|out of bounds"):
        model.predict_proba(*(batch[n] for n in INPUT_NAMES))


@pytest.fixture(params=DEVICES)
def device_param(request) -> str:
    return request.param


def test_distill_epoch_gives_the_same_loss_curve_with_either_backend():
    # The shipped training recipe (DistillConfig defaults: counting prior "stack" with out-of-fold
    # rule logits, the wide table from zero, dropout 0.4 with the same seed) on 16 synthetic patients:
    # 28 training samples in 2 batches, histories cut to 2 visits (under the interpreter every visit
    # slot of every patient is one program per bag). Tolerance 1e-4 relative: fp32 sums in another
    # order, compounded over the epoch's Adam steps.
    from leader_edge.data.splits import dataset_splits
    from leader_edge.bedside.encoding import KINDS, Encoder
    from leader_edge.data.synth import synth_dataset
    from leader_edge.train.distill import DistillConfig, code_limit, train_student

    ds = synth_dataset(patients=16, seed=3)
    samples = dataset_splits(ds, seed=0, train_all_visits=True)
    train_patients = {s.patient_id for s in samples["train"]}
    histories = {}
    for backend in ("torch", "triton"):
        config = DistillConfig(epochs=1, batch_size=16, max_visits=2, backend=backend)
        encoder = Encoder.from_visits({k: ds.vocab(k) for k in KINDS}, [v for v in ds.visits if v.patient_id in train_patients],
                                      max_visits=config.max_visits, max_codes=code_limit(ds, config))
        model, histories[backend], _ = train_student(ds, samples, encoder, config, teacher=None, seed=0, device=torch.device("cpu"))
        assert model.config.backend == backend
    torch_curve, triton_curve = histories["torch"], histories["triton"]
    assert [h["epoch"] for h in triton_curve] == [h["epoch"] for h in torch_curve] == [0, 1]
    for want, got in zip(torch_curve, triton_curve):
        for key in ("val_prauc", "train_loss", "train_bce", "train_nce"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (want["epoch"], key)
