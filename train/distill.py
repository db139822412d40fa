"""The student stage: train LEADER(S) on labels (+ the teacher's cached features), save it, score it.

    run_student_stage(data_dir, run_dir)                  # -> RUN/student/
    run_student_stage(data_dir, run_dir, distill=False)   # -> RUN/student-nodistill/

Loss = BCE + alpha * MSE(proj(student hidden), teacher feature) + w * InfoNCE(profile, medications)
(+ an optional DDI penalty). Adam lr 5e-4, early stopping on validation PRAUC, decision threshold
tuned on validation. The teacher never runs here: its features are read from
RUN/teacher/features.safetensors (one row per sample key, see the run-directory contract).
Teacher features are standardised per dimension with training statistics before the MSE: raw
LLM hidden states after the final norm have a few dimensions 10-100x larger than the rest, which
would otherwise dominate the loss.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from leader_edge.evaluation import metrics
from leader_edge.data.dataset import Dataset, load_dataset
from leader_edge.bedside.encoding import INPUT_NAMES, KINDS, Batch, Encoder
from leader_edge.errors import ConfigError
from leader_edge.progress import progress
from leader_edge.bedside.recs import write_predictions
from leader_edge.data.splits import Sample, dataset_splits
from leader_edge.train.student import Student, StudentConfig
from leader_edge.train.teacher_config import check_types
from leader_edge.train.stage_files import load_teacher_features, student_dir_name, teacher_probabilities, write_student_dir
from leader_edge.train.code_embeddings import pca_init
from leader_edge.train.student_init import (
    cooc_log_odds, fit_prior_mix, frequency_prior, low_rank, name_neighbour_prior, teacher_name_vectors, train_code_rows, wide_rank,
)

log = logging.getLogger(__name__)



def _model_default(name: str):
    """A StudentConfig field's default: the model's shape settings have one definition, there."""
    return StudentConfig.__dataclass_fields__[name].default


@dataclass
class DistillConfig:
    epochs: int = 40  # upper bound; early stopping ends synth runs at ~15-25 epochs
    patience: int = 6  # epochs without a better validation PRAUC before stopping
    batch_size: int = 64
    lr: float = 5e-4  # LEADER's Adam learning rate
    weight_decay: float = 0.0
    # The model's shape, as LEADER(S) (defaults: StudentConfig's, so they are written once).
    dim: int = _model_default("dim")
    heads: int = _model_default("heads")
    hidden: int = _model_default("hidden")
    dropout: float = _model_default("dropout")
    ffn_mult: int = _model_default("ffn_mult")
    temperature: float = _model_default("temperature")
    train_all_visits: bool = True  # one sample per visit prefix: test Jaccard 0.401 -> 0.417 on default synth (no-distill)
    # The model's settings with StudentConfig's defaults (reasons there): alpha 0.1, InfoNCE 0.005,
    # no DDI term, 8 visits, wide "max", set encoder "mean", counting prior "frequency", backend "auto".
    alpha: float = _model_default("alpha")
    info_nce: float = _model_default("info_nce")
    ddi_weight: float = _model_default("ddi_weight")
    max_visits: int = _model_default("max_visits")
    max_codes: int = 32  # per visit and kind; raised to the dataset's longest visit (`code_limit`)
    timing_patients: int = 100  # test patients timed one at a time for the per-patient latency
    code_groups: bool = True  # ICD/ATC parent embeddings: test Jaccard 0.4635 -> 0.4691 (earlier synth; within noise)
    threads: int = 1  # torch CPU threads; on the shared 2-core VM 2 threads ran epochs 1.1-9x SLOWER (contention)
    wide: str = _model_default("wide")  # default synth, no-distill, val PRAUC 0.6075 -> 0.6358 with "max" + cooc init
    wide_rank: int | None = None  # None: full [n_codes, n_meds] table if it fits the 1M budget, else rank 64
    wide_init: str = "cooc"  # "cooc": training co-occurrence log-odds lift; "zero": learned from zero
    wide_smoothing: float = 2.0  # pseudo-visits pulling a rare code's P(med|code) toward the prior
    wide_weight_decay: float = 0.0  # L2 on the wide table only
    wide_lr: float | None = None  # wide table lr; None: `lr`. 0 (init kept fixed): val PRAUC 0.6350 vs 0.6358, noise
    # Teacher name knowledge (distilled student only). On default synth, with the wide path, neither
    # moved validation PRAUC beyond noise (0.6358 none; 0.6318 code_init="input" at scale 0.1;
    # 0.6363 wide_neighbours=10 with smoothing 8), so both are off by default.
    code_init: str = "none"  # "input"/"hidden": code embeddings from the teacher's name embeddings (PCA)
    code_init_layers: int = 4  # decoder layers for code_init="hidden"
    code_init_scale: float = 0.1  # std of the PCA-reduced name embeddings (random init: 0.02)
    teacher_spec: str | None = None  # backbone for code_init; None: RUN/teacher/config.json's
    zero_head: bool = False  # deep head starts at 0 (training starts at the wide init): val PRAUC 0.6395 vs 0.6358, noise
    wide_neighbours: int = 0  # distilled only: smooth the wide init toward the k name-nearest codes (0 = global prior)
    set_encoder: str = _model_default("set_encoder")
    # StudentConfig.prior: "frequency" adds the frequency baseline's logit (out-of-fold on training
    # samples) and starts the learned terms at 0, so training starts AT counting; validation
    # before the first epoch is a candidate, so early stopping can keep the counting prior itself.
    # Chosen on validation PRAUC (default synth, distilled, seeds 42/43/44, 2026-12-02): "none"
    # 0.6379/0.6399/0.6359; "frequency" with validation's one rule 0.6403 x3 (epoch 0 kept every time:
    # training only made it worse); with prior_rule "stack" 0.6512/0.6527/0.6522. BENCHMARKS.md
    # "Beat counting" has the held-out check (8,000 patients) and the second synthetic setting.
    prior: str = _model_default("prior")
    # How the built model's StudentConfig.prior_rule is chosen: "stack" (all four counting rules
    # mixed) or "chosen" (validation's one rule). A recipe choice, so it is defined here.
    prior_rule: str = "stack"
    # Output-level distillation: weight of BCE(student logits, teacher probabilities) on training
    # samples (the teacher's head applied to its cached features); 0 = off (LEADER has none).
    kd: float = 0.0
    # StudentConfig.backend: "auto" runs the Triton kernels on CUDA and the torch forms on CPU;
    # "triton" forces the kernels (CPU only under TRITON_INTERPRET=1: tests), "torch" the torch forms.
    backend: str = _model_default("backend")

    def __post_init__(self) -> None:
        check_types(self, "DistillConfig")  # a TOML `dim = "big"` was a TypeError in a comparison
        # The model's shape is checked where it is defined, now rather than after the teacher stage.
        StudentConfig(1, 1, 1, 0, dim=self.dim, heads=self.heads, hidden=self.hidden, dropout=self.dropout,
                      ffn_mult=self.ffn_mult, temperature=self.temperature)
        if self.kd < 0:
            raise ConfigError(f"DistillConfig.kd={self.kd} must be >= 0")
        if self.kd > 0 and self.wide == "none" and self.prior == "none":
            raise ConfigError("DistillConfig.kd > 0 needs the logits path: set wide='max' or prior='frequency'")
        for name in ("epochs", "patience", "batch_size", "max_visits", "max_codes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"DistillConfig.{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"DistillConfig.lr={self.lr} must be > 0")
        if self.prior != "none":
            # The counting prior starts every learned term at 0, so the wide table's initial values
            # are never used: these settings would be silently ignored (a 10-seed held-out run of
            # wide_neighbours=10 with the default prior scored identically to the default).
            fields = DistillConfig.__dataclass_fields__
            ignored = [f"{name}={getattr(self, name)!r}" for name in ("wide_init", "wide_smoothing", "wide_neighbours", "zero_head")
                       if getattr(self, name) != fields[name].default]
            if ignored:
                raise ConfigError(f"DistillConfig {', '.join(ignored)} has no effect with prior={self.prior!r}: the "
                                  "counting prior starts the wide table at 0; remove it, or set prior = \"none\" to use it")
        for name, allowed in (("wide", ("max", "mean", "none")), ("wide_init", ("cooc", "zero")),
                              ("code_init", ("none", "input", "hidden")),
                              ("set_encoder", ("transformer", "mean")), ("prior", ("none", "frequency")),
                              ("prior_rule", ("stack", "chosen")), ("backend", ("auto", "triton", "torch"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"DistillConfig.{name}={getattr(self, name)!r}; use one of {allowed}")


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def trim(batch: Batch, index: np.ndarray) -> dict[str, np.ndarray]:
    """Rows `index` of a pre-encoded split, with all-padding visit slots and code columns cut off."""
    mask = batch.visit_mask[index]
    first = int(np.argmax(mask.any(0)))  # right-aligned: leading slots are empty for every row
    out = {"visit_mask": mask[:, first:], "profile": batch.profile[index]}
    for name in ("diagnoses", "procedures", "medications"):
        a = getattr(batch, name)[index, first:]
        width = max(1, int((a >= 0).sum(-1).max()))  # ids are left-packed within a visit
        out[name] = a[..., :width]
    t = batch.target_medications[index]
    out["target_medications"] = t[:, : max(1, int((t >= 0).sum(-1).max()))]
    return out


def batches(n_visits: np.ndarray, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of samples with similar visit counts, in shuffled order.

    Every batch is padded to its longest patient, and 70% of synth/MIMIC patients have one visit:
    grouping by visit count cut an epoch from ~9 s to ~2.3 s on the 2-core VM with the same samples.
    """
    order = np.lexsort((rng.random(len(n_visits)), n_visits))  # by visit count, random within a count
    out = [order[i : i + size] for i in range(0, len(order), size)]
    return [out[i] for i in rng.permutation(len(out))]


def _tensors(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}


@torch.inference_mode()
def predict(model: Student, batch: Batch, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """float32 [N, n_meds] probabilities for a pre-encoded split."""
    model.eval()
    out = []
    for start in range(0, len(batch), batch_size):
        t = _tensors(trim(batch, np.arange(start, min(start + batch_size, len(batch)))), device)
        out.append(model.predict_proba(*(t[n] for n in INPUT_NAMES)).float().cpu().numpy())
    return np.concatenate(out)


@torch.inference_mode()
def latency_ms(model: Student, batch: Batch, n: int) -> float:
    """Median milliseconds of one patient's forward at batch 1 on one CPU thread (model only).

    One thread: at batch 1 there is nothing to split, and on the shared 2-core VM two threads
    measured 30x slower (120 ms vs 4 ms) from contention alone.
    """
    model.eval()
    device = next(model.parameters()).device
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    try:
        for i in range(min(n, len(batch)) + 5):
            t = _tensors(trim(batch, np.array([i % len(batch)])), device)
            start = time.perf_counter()
            model.predict_proba(*(t[k] for k in INPUT_NAMES))
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return float(np.median(times[5:]) * 1000)  # the first 5 are warm-up


def train_student(
    ds: Dataset, samples: dict[str, list[Sample]], encoder: Encoder, config: DistillConfig, *,
    teacher: dict[str, np.ndarray] | None, seed: int, device: torch.device, run_dir: Path | None = None,
) -> tuple[Student, list[dict], int]:
    """Train with early stopping on validation PRAUC; return (best model, history, best epoch).

    With `teacher`, the code embeddings start from the teacher's name embeddings (`config.code_init`,
    cached under `run_dir`); without, from random - the label-only student never sees the teacher.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    enc = {k: encoder.encode([s.visits for s in v]) for k, v in samples.items() if k in ("train", "val")}
    labels = {k: encoder.multi_hot([s.visits for s in samples[k]]) for k in enc}
    groups = encoder.code_groups()
    student_config = StudentConfig(
        encoder.n_codes, encoder.n_meds, encoder.n_profile_ids, encoder.med_offset,
        n_groups=int(groups.max()) + 1 if config.code_groups and len(groups) else 0,
        max_visits=encoder.max_visits, teacher_dim=0 if teacher is None else teacher["train"].shape[1],
        alpha=config.alpha if teacher is not None else 0.0, info_nce=config.info_nce, ddi_weight=config.ddi_weight,
        wide=config.wide, set_encoder=config.set_encoder, prior=config.prior, backend=config.backend,
        dim=config.dim, heads=config.heads, hidden=config.hidden, dropout=config.dropout, ffn_mult=config.ffn_mult,
        temperature=config.temperature,
    )
    prior_tables, prior_train = None, None
    if config.prior != "none":
        prior_tables, prior_train = frequency_prior(ds, samples, encoder, seed=seed,
                                                    rule="stack" if config.prior_rule == "stack" else None)
        student_config = StudentConfig(**{**student_config.to_json(), "prior_rule": prior_tables["rule"]})
    if config.wide != "none":
        deep = Student(StudentConfig(**{**student_config.to_json(), "wide": "none"})).n_params()
        rank = wide_rank(encoder.n_codes, encoder.n_meds, deep) if config.wide_rank is None else config.wide_rank
        student_config = StudentConfig(**{**student_config.to_json(), "wide_rank": rank})
    model = Student(student_config).to(device)
    model.set_code_groups(groups)
    with torch.no_grad():  # start from the label prior: the first epochs then learn codes, not base rates
        prior = labels["train"].mean(0).clip(1e-4, 1 - 1e-4)
        model.head_bias.copy_(torch.from_numpy(np.log(prior / (1 - prior))))
        if prior_tables is not None:  # the counting prior carries base rates and co-occurrence: learned terms start at 0
            model.set_prior(prior_tables["table"], prior_tables["weight"], prior_tables["global"], prior_tables["global_weight"])
            model.head_bias.zero_()
            model.head_weight.zero_()
            if prior_tables["rule"] == "stack":  # the rules' mix and a per-medication bias, fitted before training
                from leader_edge.train.student import PRIOR_RULES

                mix, bias = fit_prior_mix(prior_train, labels["train"], PRIOR_RULES.index(prior_tables["chosen"]))
                model.prior_mix.copy_(torch.from_numpy(mix))
                model.head_bias.copy_(torch.from_numpy(bias))
        names = None
        if teacher is not None and (config.code_init != "none" or config.wide_neighbours > 0):
            names = teacher_name_vectors(ds, encoder, Path(run_dir or "."), method=config.code_init if config.code_init != "none"
                                         else "input", layers=config.code_init_layers, spec=config.teacher_spec)
        if model.wide_codes is not None and config.wide_init == "cooc" and prior_tables is None:
            near = None
            if names is not None and config.wide_neighbours > 0:
                kinds = np.repeat(np.arange(len(KINDS)), [len(encoder.codes[k]) for k in KINDS])
                near = name_neighbour_prior(enc["train"], labels["train"], names, kinds, config.wide_neighbours)
            table = cooc_log_odds(enc["train"], labels["train"], encoder.n_codes, config.wide_smoothing, near)
            if config.zero_head:
                model.head_weight.zero_()
            if model.wide_meds is None:
                model.wide_codes.copy_(torch.from_numpy(table))
            else:
                left, right = low_rank(table, model.config.wide_rank)
                model.wide_codes.copy_(torch.from_numpy(left))
                model.wide_meds.copy_(torch.from_numpy(right))
        if names is not None and config.code_init != "none":
            init = pca_init(names, train_code_rows(enc["train"], encoder.n_codes), model.config.dim, config.code_init_scale)
            model.code_emb.copy_(torch.from_numpy(init))
    wide = [p for p in (model.wide_codes, model.wide_meds) if p is not None]
    rest = [p for p in model.parameters() if all(p is not w for w in wide)]
    ddi = torch.from_numpy(metrics.ddi_matrix(ds.ddi, encoder.codes["medication"]).astype(np.float32)).to(device)
    opt = torch.optim.Adam([{"params": rest, "weight_decay": config.weight_decay},
                            {"params": wide, "weight_decay": config.wide_weight_decay,
                             "lr": config.lr if config.wide_lr is None else config.wide_lr}], lr=config.lr)
    history: list[dict] = []
    best, best_epoch, best_state = -1.0, 0, None
    if prior_tables is not None:  # epoch 0 = the baseline itself: kept unless training beats it on validation
        best = metrics.score(labels["val"] > 0, predict(model, enc["val"], device), 0.5)["prauc"]
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append({"epoch": 0, "val_prauc": round(best, 5)})
    kd_train = None
    if config.kd > 0 and teacher is not None:
        kd_train = teacher_probabilities(run_dir, samples["train"])
    n = len(enc["train"])
    n_visits = enc["train"].visit_mask.sum(1)
    # One bar over the epochs (an upper bound: early stopping may end it sooner), loss and
    # validation PRAUC as it goes; the per-epoch line stays in the INFO log (-v).
    bar = progress(config.epochs, desc=f"student{'' if teacher is not None else ' (labels only)'}", unit="epoch")
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        model.train()
        sums = {"loss": 0.0, "bce": 0.0, "mse": 0.0, "nce": 0.0, "ddi": 0.0}
        for idx in batches(n_visits, config.batch_size, rng):
            batch = _tensors(trim(enc["train"], idx), device)
            batch["labels"] = torch.from_numpy(labels["train"][idx]).to(device)
            batch["ddi"] = ddi
            if teacher is not None:
                batch["teacher"] = torch.from_numpy(teacher["train"][idx]).to(device)
            if prior_train is not None:
                batch["prior"] = torch.from_numpy(prior_train[idx]).to(device)
            out = model(batch, keep_logits=kd_train is not None)  # the fused loss kernel keeps no logits unless asked
            if kd_train is not None:  # output-level distillation toward the teacher's probabilities
                soft = torch.from_numpy(kd_train[idx]).to(device)
                out["loss"] = out["loss"] + config.kd * F.binary_cross_entropy_with_logits(out["logits"], soft)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            for k in sums:
                sums[k] += float(out[k].detach()) * len(idx) / n
        y_prob = predict(model, enc["val"], device)
        val = metrics.score(labels["val"] > 0, y_prob, 0.5)
        history.append({"epoch": epoch, **{f"train_{k}": round(v, 5) for k, v in sums.items()},
                        "val_prauc": round(val["prauc"], 5), "val_jaccard": round(val["jaccard"], 5),
                        "seconds": round(time.perf_counter() - start, 2)})
        log.info("epoch %d: loss %.4f (bce %.4f mse %.4f) val PRAUC %.4f Jaccard@0.5 %.4f (%.1f s)", epoch,
                 sums["loss"], sums["bce"], sums["mse"], val["prauc"], val["jaccard"], history[-1]["seconds"])
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss']:.4f}", val_prauc=f"{val['prauc']:.4f}", best=f"{max(best, val['prauc']):.4f}")
        if val["prauc"] > best:
            best, best_epoch = val["prauc"], epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= config.patience:
            log.info("early stop: no better validation PRAUC for %d epochs (best %.4f at epoch %d)", config.patience, best, best_epoch)
            break
    bar.close()
    model.load_state_dict(best_state)
    return model, history, best_epoch


def code_limit(ds: Dataset, config: DistillConfig) -> int:
    """The encoder's per-visit, per-kind code limit: `config.max_codes` or, when a visit of the dataset
    has more codes of a kind, that many - so no code of the data is cut, and the counting prior
    (which reads every code) sees the same codes in training, validation, test and the bundle.
    A longer visit at the bedside is cut at this limit and counted by `predict`."""
    longest = max((len(set(v.codes(k))) for v in ds.visits for k in KINDS), default=0)
    return max(config.max_codes, longest)


def run_student_stage(
    data_dir: Path, run_dir: Path, *, distill: bool = True, seed: int = 42, epochs: int | None = None,
    device: str = "auto", config: DistillConfig | None = None, train_seed: int | None = None, protocol: str = "leader",
) -> dict:
    """Train, tune, save and score one student into RUN/student (or RUN/student-nodistill).

    Args:
        data_dir: dataset directory. run_dir: the run directory (RUN/teacher is read when `distill`).
        distill: add the teacher feature loss; False trains the same student on labels alone.
        seed: split seed, and training seed unless `train_seed` is given (the same seeds reproduce the metrics).
        train_seed: initialisation and shuffling seed; a seed other than `seed` writes
            RUN/student.seed-N (see `student_dir_name`), same split.
        protocol: "leader" or "safedrug" (`leader_edge.data.dataset.PROTOCOLS`): the split and the test samples.
        epochs: overrides `config.epochs`. device: "auto", "cpu" or "cuda".
        config: training settings; defaults to `DistillConfig()`.

    Returns:
        The metrics dict also written to metrics.json.
    """
    config = config or DistillConfig()
    if epochs is not None:
        config = DistillConfig(**{**asdict(config), "epochs": epochs})
    data_dir, run_dir = Path(data_dir).resolve(), Path(run_dir)
    dev = _device(device)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run(data_dir, run_dir, distill=distill, seed=seed, device=dev, config=config,
                    train_seed=seed if train_seed is None else train_seed, protocol=protocol)
    finally:
        torch.set_num_threads(threads)


def _run(data_dir: Path, run_dir: Path, *, distill: bool, seed: int, device: torch.device, config: DistillConfig,
         train_seed: int, protocol: str) -> dict:
    dev = device
    started = time.perf_counter()
    ds = load_dataset(data_dir)
    samples = dataset_splits(ds, seed=seed, train_all_visits=config.train_all_visits, protocol=protocol)
    train_patients = {s.patient_id for s in samples["train"]}
    encoder = Encoder.from_visits({k: ds.vocab(k) for k in KINDS}, [v for v in ds.visits if v.patient_id in train_patients],
                                  max_visits=config.max_visits, max_codes=code_limit(ds, config))
    teacher = load_teacher_features(run_dir, samples) if distill else None
    model, history, best_epoch = train_student(ds, samples, encoder, config, teacher=teacher, seed=train_seed, device=dev,
                                                 run_dir=run_dir)
    train_seconds = time.perf_counter() - started

    encoded = {k: encoder.encode([s.visits for s in samples[k]]) for k in ("val", "test")}
    truth = {k: encoder.multi_hot([s.visits for s in samples[k]]) > 0 for k in encoded}
    prob = {k: predict(model, encoded[k], dev) for k in encoded}
    threshold = metrics.tune_threshold(truth["val"], prob["val"])
    ddi = metrics.ddi_matrix(ds.ddi, encoder.codes["medication"])
    per_visit = metrics.per_visit_metrics(truth["test"], prob["test"], prob["test"] >= threshold, ddi)
    n_visits = {pid: len(v) for pid, v in ds.patients().items()}
    multi = np.array([n_visits[s.patient_id] > 1 for s in samples["test"]])
    units = np.unique([s.patient_id for s in samples["test"]], return_inverse=True)[1]
    model.cpu()
    result = {
        "model": "student" if distill else "student-nodistill",
        "threshold": threshold,
        "val": metrics.score(truth["val"], prob["val"], threshold, ddi),
        "test": metrics.summarize(per_visit),
        "test_groups": {g: {k: (v if k == "point" else list(v)) for k, v in stats.items()}
                        for g, stats in metrics.by_group(per_visit, multi, units=units).items()},
        "n_params": model.n_params(),
        "n_params_training": model.n_params(inference=False),
        "inference_ms_per_patient": round(latency_ms(model, encoded["test"], config.timing_patients), 3),
        "best_epoch": best_epoch,
        "epochs_run": sum(h["epoch"] > 0 for h in history),  # epoch 0 (the counting prior alone) is not a trained epoch
        "train_seconds": round(train_seconds, 1),
        "train_samples": len(samples["train"]),
        "unknown_codes_test": int(encoded["test"].unknown.sum()),
        "seed": seed,
        "train_seed": train_seed,
        "protocol": protocol,
        "config": asdict(config),
    }
    name = student_dir_name(distill, seed, train_seed)
    def extra_files(tmp: Path) -> None:
        (tmp / "history.json").write_text(json.dumps(history, indent=2) + "\n", encoding="utf-8")
        write_predictions(tmp / "predictions-test.csv", [s.patient_id for s in samples["test"]],
                          [s.target.visit_id for s in samples["test"]], prob["test"], encoder.codes["medication"], threshold)

    write_student_dir(run_dir / name, model, encoder, threshold, {"distill": distill, "seed": seed, "train_seed": train_seed,
                                                                  "protocol": protocol, "data": str(data_dir)}, result, extra_files)
    log.info("%s: test Jaccard %.4f PRAUC %.4f F1 %.4f (threshold %.2f, %d params, %.1f s)", name,
             result["test"]["jaccard"], result["test"]["prauc"], result["test"]["f1"], threshold, result["n_params"], train_seconds)
    return result
