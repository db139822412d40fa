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
}
GROUPS = ("overall", "single_visit", "multi_visit", "rare_diagnosis")


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--teacher-run", type=Path, required=True)
    p.add_argument("--heldout", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", default="base,prior")
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--epochs", type=int, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    import torch

    from leader_edge.evaluation import metrics
    from leader_edge.evaluation.baselines import fit_frequency_baseline
    from leader_edge.data.dataset import load_dataset
    from leader_edge.data.splits import dataset_splits
    from leader_edge.evaluation.report import group_masks
    from leader_edge.train.distill import DistillConfig, predict, run_student_stage
    from leader_edge.train.stage_files import load_student, student_dir_name

    ds, held = load_dataset(a.data), load_dataset(a.heldout)
    seeds = [int(s) for s in a.seeds.split(",")]
    splits = dataset_splits(ds, seed=seeds[0], train_all_visits=True)
    med_codes = ds.vocab("medication")
    if held.vocab("medication") != med_codes:
        sys.exit(f"{a.heldout} has another medication vocabulary than {a.data}: not the same generator world")
    samples, y = heldout_matrices(held, med_codes)
    masks = group_masks(ds, splits, samples, held)
    ddi = metrics.ddi_matrix(ds.ddi, med_codes)
    base, threshold, _ = fit_frequency_baseline(ds, splits)
    prob = base.predict_proba(samples)
    per_visit = {"frequency": [metrics.per_visit_metrics(y, prob, prob >= threshold, ddi)]}
    stack_model, stack_enc, stack_thr, stack_val = counting_stack(ds, splits, seeds[0])
    with torch.no_grad():
        pr = predict(stack_model, stack_enc.encode([s.visits for s in samples]), torch.device("cpu"))
    per_visit["counting-stack"] = [metrics.per_visit_metrics(y, pr, pr >= stack_thr, ddi)]
    val = {"counting-stack": [stack_val]}
    rows = []
    for variant in a.variants.split(","):
        exp = a.out / variant
        exp.mkdir(parents=True, exist_ok=True)
        if not (exp / "teacher").exists():
            os.symlink((a.teacher_run / "teacher").resolve(), exp / "teacher")
        config = DistillConfig(**{**asdict(DistillConfig()), **VARIANTS[variant]})
        for distill in (True, False):
            name = f"{variant}/{'student' if distill else 'student-nodistill'}"
            per_visit[name], val[name] = [], []
            for seed in seeds:
                d = exp / student_dir_name(distill, seeds[0], seed)
                if not (d / "metrics.json").exists():
                    t0 = time.perf_counter()
                    run_student_stage(a.data, exp, distill=distill, seed=seeds[0], train_seed=seed, epochs=a.epochs, config=config)
                    print(f"trained {name} seed {seed} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
                m = json.loads((d / "metrics.json").read_text())
                model, encoder, thr = load_student(d)
                with torch.no_grad():
                    pr = predict(model, encoder.encode([s.visits for s in samples]), torch.device("cpu"))
                per_visit[name].append(metrics.per_visit_metrics(y, pr, pr >= thr, ddi))
                val[name].append(m["val"]["prauc"])
    units = np.arange(len(samples))
    summary = {}
    for name, runs in per_visit.items():
        summary[name] = {g: {k: float(np.mean([r[k][mask].mean() for r in runs])) for k in ("jaccard", "prauc", "f1")}
                         for g, mask in masks.items()}
        summary[name]["val_prauc"] = val.get(name)
    pairs = []
    variants = a.variants.split(",")
    for v in variants:
        pairs += [(f"{v}/student", "frequency"), (f"{v}/student", f"{v}/student-nodistill"), (f"{v}/student-nodistill", "frequency")]
        if v != variants[0]:
            pairs += [(f"{v}/student", f"{variants[0]}/student")]
        pairs += [(f"{v}/student", "counting-stack"), (f"{v}/student-nodistill", "counting-stack")]
    for x, z in pairs:
        for g, mask in masks.items():
            for k in ("prauc", "jaccard"):
                d, lo, hi = metrics.paired_interval(np.stack([r[k][mask] for r in per_visit[x]]),
                                                    np.stack([r[k][mask] for r in per_visit[z]]))
                rows.append({"a": x, "b": z, "group": g, "metric": k, "diff": d, "low": lo, "high": hi})
    out = {"data": str(a.data), "heldout": str(a.heldout), "heldout_patients": len(samples),
           "groups_n": {g: int(m.sum()) for g, m in masks.items()}, "seeds": seeds, "models": summary, "comparisons": rows,
           "baseline": {"rule": base.rule, "smoothing": base.smoothing, "threshold": threshold}, "units": len(units)}
    (a.out / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"held-out: {len(samples)} patients ({ {g: int(m.sum()) for g, m in masks.items()} }); seeds {seeds}")
    print(f"{'model':<32} {'val PRAUC (seeds)':<26} " + " ".join(f"{g[:12]:>13}" for g in GROUPS) + "   (held-out PRAUC / Jaccard)")
    for name, s in summary.items():
        vp = "-" if not s["val_prauc"] else " ".join(f"{v:.4f}" for v in s["val_prauc"])
        print(f"{name:<32} {vp:<26} " + " ".join(f"{s[g]['prauc']:.4f}/{s[g]['jaccard']:.4f}" for g in GROUPS))
    print("\npaired differences, 95% interval (seeds pooled):")
    for r in rows:
        flag = "*" if r["low"] > 0 or r["high"] < 0 else " "
        print(f"{flag} {r['a']:<26} - {r['b']:<26} {r['group']:<15} {r['metric']:<8} {r['diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]")


if __name__ == "__main__":
    main()
