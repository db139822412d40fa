"""Student variants x seeds, judged on a large held-out cohort with paired intervals (issue: beat counting).

    python benchmarks/bench_heldout.py --data D --teacher-run RUN --heldout H --out EXP \
        --variants base,prior,prior-kd --seeds 42,43,44 [--epochs 40]

D is the training dataset (its seeded 8:1:1 split: train / val for selection / test), RUN a run
whose teacher stage is finished on D (its features cover D's train and val samples only - the
teacher never scores held-out patients). H is a held-out dataset directory from the same
generator world (e.g. `leader-edge synth --patients 8000 --seed 42`: the same codes and
medication classes, other patients). For every variant and seed the script trains the distilled
and the labels-only student into EXP/<variant>/ (the teacher directory linked), then scores every
held-out patient's last visit (LEADER protocol) with each student (its validation-tuned threshold)
and with the frequency baseline fitted on D's training split. It prints and writes EXP/results.json:
validation PRAUC per model and seed (the only numbers used to choose defaults), held-out
Jaccard/PRAUC/F1 per model, and paired 95% bootstrap intervals (seeds pooled) for distilled -
baseline, distilled - labels-only and variant - base, overall / single-visit / multi-visit /
rare-diagnosis (a diagnosis seen in < 5 training visits).

Two intervals per comparison: patients resampled with the seeds pooled (the patient sampling of the
seed-averaged model), and patients AND training seeds resampled (`paired_interval(resample_seeds=True)`),
which also carries the spread between training runs - a comparison is called beyond noise only when
that one excludes 0. Each comparison also lists its per-seed differences.

`--select-share F` splits the held-out patients (a seeded permutation) into a selection part (a share
F, for choosing between variants: a validation cohort 20x the split's own) and a test part (the rest,
reported only); every number is then given for both parts. Per-patient metrics of every model and seed
are written to EXP/per_visit.npz (`--reuse-scores` reads them back instead of scoring again). Labels-only students are trained once per set of
settings they depend on (`--variants` that differ only in distillation settings share them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

VARIANTS = {
    "base": {"prior": "none"},  # the student before the counting prior (LEADER(S) + wide path)
    "prior": {"prior": "frequency", "prior_rule": "chosen"},  # counting (validation's rule) as a prior the student corrects
    "prior-kd": {"prior": "frequency", "prior_rule": "chosen", "kd": 0.5},  # + the teacher's probabilities as soft targets
    "kd": {"kd": 0.5},
    "prior-nowide": {"prior": "frequency", "prior_rule": "chosen", "wide": "none"},  # the deep head alone corrects it
    "prior-slow": {"prior": "frequency", "prior_rule": "chosen", "lr": 1e-4},  # corrections learned 5x slower
    "stack": {"prior": "frequency", "prior_rule": "stack"},  # all four counting rules mixed (fitted before training)
    "stack-nowide": {"prior": "frequency", "prior_rule": "stack", "wide": "none"},
    "stack-kd": {"prior": "frequency", "prior_rule": "stack", "kd": 0.5},  # + the teacher's probabilities as soft targets
    "stack-names": {"prior": "frequency", "prior_rule": "stack", "code_init": "input"},  # codes start from the teacher's name embeddings
    # the weight of the feature loss (shipped 0.1)
    "stack-a03": {"prior": "frequency", "prior_rule": "stack", "alpha": 0.3},
    "stack-a1": {"prior": "frequency", "prior_rule": "stack", "alpha": 1.0},
    "stack-a3": {"prior": "frequency", "prior_rule": "stack", "alpha": 3.0},
    # the shipped settings under another name, so a run can distil them from another --teacher-run
    # (e.g. a teacher trained with TeacherConfig.prior="frequency": it learns what counting misses)
    "stack-t2": {"prior": "frequency", "prior_rule": "stack"},
}
# Settings a labels-only student never reads: variants differing only in these share its runs.
DISTILL_ONLY = ("alpha", "kd", "code_init", "code_init_layers", "code_init_scale", "teacher_spec", "wide_neighbours")
GROUPS = ("overall", "single_visit", "multi_visit", "rare_diagnosis")
METRICS = ("jaccard", "prauc", "f1")  # per-visit metrics kept in per_visit.npz


def heldout_matrices(held, med_codes):
    from leader_edge.data.splits import make_samples

    samples = make_samples(held, list(held.patients()))
    index = {c: j for j, c in enumerate(med_codes)}
    y = np.zeros((len(samples), len(med_codes)), dtype=bool)
    for i, s in enumerate(samples):
        y[i, [index[c] for c in s.target.medications if c in index]] = True
    return samples, y


def counting_stack(ds, splits, seed: int):
    """The "stack" prior alone: a student with prior_rule="stack" whose learned terms are 0 (the
    rule mix and per-medication bias fitted as in training), threshold tuned on validation. It
    separates what better counting gives from what the trained student adds."""
    import torch

    from leader_edge.evaluation import metrics
    from leader_edge.bedside.encoding import KINDS, Encoder
    from leader_edge.train.distill import predict
    from leader_edge.train.student import PRIOR_RULES, Student, StudentConfig
    from leader_edge.train.student_init import fit_prior_mix, frequency_prior

    train_ids = {s.patient_id for s in splits["train"]}
    enc = Encoder.from_visits({k: ds.vocab(k) for k in KINDS}, [v for v in ds.visits if v.patient_id in train_ids])
    tables, oof = frequency_prior(ds, splits, enc, seed=seed, rule="stack")
    mix, bias = fit_prior_mix(oof, enc.multi_hot([s.visits for s in splits["train"]]), PRIOR_RULES.index(tables["chosen"]))
    model = Student(StudentConfig(enc.n_codes, enc.n_meds, enc.n_profile_ids, enc.med_offset, prior="frequency",
                                  prior_rule="stack", wide="none")).eval()
    model.set_prior(tables["table"], tables["weight"], tables["global"], tables["global_weight"])
    with torch.no_grad():
        model.head_weight.zero_()
        model.head_bias.copy_(torch.from_numpy(bias))
        model.prior_mix.copy_(torch.from_numpy(mix))
    val_prob = predict(model, enc.encode([s.visits for s in splits["val"]]), torch.device("cpu"))
    y_val = enc.multi_hot([s.visits for s in splits["val"]]) > 0
    return model, enc, metrics.tune_threshold(y_val, val_prob), metrics.score(y_val, val_prob, 0.5)["prauc"]


def train_and_score(a, variant: str, distill: bool, seeds: list[int], samples, score, saved) -> tuple[list, list]:
    """Train (or reuse) one variant's students for every seed; per-visit held-out metrics (from
    `saved`, an earlier run's per_visit.npz, where it holds them) and validation PRAUC per seed."""
    import torch

    from leader_edge.train.distill import DistillConfig, predict, run_student_stage
    from leader_edge.train.stage_files import load_student, student_dir_name

    settings = VARIANTS[variant]
    if distill:
        exp = a.out / variant
    else:  # one labels-only run per set of settings it reads
        shared = {k: v for k, v in sorted(settings.items()) if k not in DISTILL_ONLY}
        exp = a.out / ("_nodistill-" + ("-".join(f"{k}={v}" for k, v in shared.items()) or "default"))
    exp.mkdir(parents=True, exist_ok=True)
    if distill and not (exp / "teacher").exists():
        os.symlink((a.teacher_run / "teacher").resolve(), exp / "teacher")
    config = DistillConfig(**{**asdict(DistillConfig()), **settings})
    runs, val = [], []
    for seed in seeds:
        d = exp / student_dir_name(distill, seeds[0], seed)
        if not (d / "metrics.json").exists():
            t0 = time.perf_counter()
            run_student_stage(a.data, exp, distill=distill, seed=seeds[0], train_seed=seed, epochs=a.epochs, config=config)
            print(f"trained {variant} {'distilled' if distill else 'labels-only'} seed {seed} in "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        name = f"{variant}/{'student' if distill else 'student-nodistill'}"
        if f"{name}|{seed}|prauc" in saved:
            runs.append({k: saved[f"{name}|{seed}|{k}"] for k in METRICS if f"{name}|{seed}|{k}" in saved})
        else:
            model, encoder, thr = load_student(d)
            with torch.no_grad():
                pr = predict(model, encoder.encode([s.visits for s in samples]), torch.device("cpu"))
            runs.append(score(pr, thr))
        val.append(json.loads((d / "metrics.json").read_text())["val"]["prauc"])
    return runs, val


def compare(per_visit: dict, x: str, z: str, mask: np.ndarray, k: str) -> dict:
    """a - b on the patients of `mask`: pooled and seed-resampled intervals, per-seed differences."""
    from leader_edge.evaluation import metrics

    ra = np.stack([r[k][mask] for r in per_visit[x]])
    rb = np.stack([r[k][mask] for r in per_visit[z]])
    d, lo, hi = metrics.paired_interval(ra, rb)
    _, slo, shi = metrics.paired_interval(ra, rb, resample_seeds=True)
    by_seed = [float(v) for v in (ra.mean(1) - rb.mean(1))] if len(ra) == len(rb) else [float(v) for v in ra.mean(1) - rb.mean()]
    return {"diff": d, "low": lo, "high": hi, "seed_low": slo, "seed_high": shi, "by_seed": by_seed}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--teacher-run", type=Path, required=True)
    p.add_argument("--heldout", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", default="base,prior")
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--select-share", type=float, default=0.0,
                   help="share of held-out patients set aside for choosing between variants (0: none)")
    p.add_argument("--reuse-scores", action="store_true",
                   help="read held-out metrics of students already scored from OUT/per_visit.npz (same held-out file)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    import torch

    from leader_edge.evaluation import metrics
    from leader_edge.evaluation.baselines import fit_frequency_baseline
    from leader_edge.data.dataset import load_dataset
    from leader_edge.data.splits import dataset_splits
    from leader_edge.evaluation.report import group_masks
    from leader_edge.train.distill import predict

    ds, held = load_dataset(a.data), load_dataset(a.heldout)
    seeds = [int(s) for s in a.seeds.split(",")]
    splits = dataset_splits(ds, seed=seeds[0], train_all_visits=True)
    med_codes = ds.vocab("medication")
    if held.vocab("medication") != med_codes:
        sys.exit(f"{a.heldout} has another medication vocabulary than {a.data}: not the same generator world")
    samples, y = heldout_matrices(held, med_codes)
    masks = group_masks(ds, splits, samples, held)
    parts = {"all": np.ones(len(samples), dtype=bool)}
    if a.select_share > 0:
        order = np.random.default_rng(0).permutation(len(samples))
        select = np.zeros(len(samples), dtype=bool)
        select[order[: int(round(a.select_share * len(samples)))]] = True
        parts = {"select": select, "test": ~select}
    ddi = metrics.ddi_matrix(ds.ddi, med_codes)

    def score(prob, threshold):
        return metrics.per_visit_metrics(y, prob, prob >= threshold, ddi)

    base, threshold, _ = fit_frequency_baseline(ds, splits)
    per_visit = {"frequency": [score(base.predict_proba(samples), threshold)]}
    stack_model, stack_enc, stack_thr, stack_val = counting_stack(ds, splits, seeds[0])
    with torch.no_grad():
        per_visit["counting-stack"] = [score(predict(stack_model, stack_enc.encode([s.visits for s in samples]),
                                                     torch.device("cpu")), stack_thr)]
    val = {"counting-stack": [stack_val]}
    variants = a.variants.split(",")
    from leader_edge.files import sha256

    held_sha = sha256(a.heldout / "visits.csv")
    saved = {}
    if a.reuse_scores and (a.out / "per_visit.npz").exists():
        with np.load(a.out / "per_visit.npz") as z:
            if "heldout_sha256" not in z.files or str(z["heldout_sha256"]) != held_sha:
                sys.exit(f"{a.out / 'per_visit.npz'} was scored on another held-out file than {a.heldout / 'visits.csv'} "
                         "(sha256 differs or was not recorded): drop --reuse-scores, or use another --out")
            saved = {k: z[k].astype(np.float64) for k in z.files if k.count("|") == 2 and not k.startswith(("mask|", "part|"))}
    for variant in variants:
        for distill in (True, False):
            name = f"{variant}/{'student' if distill else 'student-nodistill'}"
            per_visit[name], val[name] = train_and_score(a, variant, distill, seeds, samples, score, saved)
    scored = {f"{name}|{seed}|{k}": r[k] for name, runs in per_visit.items() if "/" in name
              for seed, r in zip(seeds, runs) for k in METRICS if k in r}
    np.savez_compressed(a.out / "per_visit.npz", heldout_sha256=np.array(held_sha),  # earlier variants' scores kept
                        **{k: v.astype(np.float32) for k, v in {**saved, **scored}.items()},
                        **{f"mask|{g}": m for g, m in masks.items()}, **{f"part|{q}": m for q, m in parts.items()})
    summary = {q: {name: {g: {k: float(np.mean([r[k][mask & part].mean() for r in runs])) for k in METRICS if k in runs[0]}
                          for g, mask in masks.items()} for name, runs in per_visit.items()} for q, part in parts.items()}
    pairs = []
    for v in variants:
        pairs += [(f"{v}/student", "frequency"), (f"{v}/student", f"{v}/student-nodistill"), (f"{v}/student-nodistill", "frequency")]
        if v != variants[0]:
            pairs += [(f"{v}/student", f"{variants[0]}/student")]
        pairs += [(f"{v}/student", "counting-stack"), (f"{v}/student-nodistill", "counting-stack")]
    rows = [{"part": q, "a": x, "b": z, "group": g, "metric": k, **compare(per_visit, x, z, mask & part, k)}
            for q, part in parts.items() for x, z in pairs for g, mask in masks.items() for k in ("prauc", "jaccard")]
    out = {"data": str(a.data), "heldout": str(a.heldout), "heldout_patients": len(samples),
           "parts": {q: int(m.sum()) for q, m in parts.items()},
           "groups_n": {q: {g: int((m & part).sum()) for g, m in masks.items()} for q, part in parts.items()},
           "seeds": seeds, "val_prauc": val, "models": summary, "comparisons": rows,
           "baseline": {"rule": base.rule, "smoothing": base.smoothing, "threshold": threshold}}
    (a.out / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"held-out: {len(samples)} patients, parts {out['parts']}; seeds {seeds}")
    for name, v in val.items():
        print(f"validation split PRAUC  {name:<34} " + " ".join(f"{x:.4f}" for x in v) + f"   mean {np.mean(v):.4f}")
    for q in parts:
        print(f"\n[{q}] {out['groups_n'][q]}")
        print(f"{'model':<34} " + " ".join(f"{g[:13]:>15}" for g in GROUPS) + "   (PRAUC / Jaccard, mean over seeds)")
        for name, s in summary[q].items():
            print(f"{name:<34} " + " ".join(f"{s[g]['prauc']:.4f}/{s[g]['jaccard']:.4f}".rjust(15) for g in GROUPS))
        print(f"\n[{q}] paired differences: patients resampled (seeds pooled) | patients and seeds resampled; "
              "* = the second excludes 0; then the difference per seed")
        for r in rows:
            if r["part"] != q:
                continue
            flag = "*" if r["seed_low"] > 0 or r["seed_high"] < 0 else " "
            print(f"{flag} {r['a']:<24} - {r['b']:<26} {r['group']:<15} {r['metric']:<8} {r['diff']:+.4f} "
                  f"[{r['low']:+.4f}, {r['high']:+.4f}] | [{r['seed_low']:+.4f}, {r['seed_high']:+.4f}]  "
                  + " ".join(f"{v:+.4f}" for v in r["by_seed"]))


if __name__ == "__main__":
    main()
