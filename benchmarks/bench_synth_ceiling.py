"""How much can any model get out of a synth cohort, and how much of that is semantics?

    .venv/bin/python benchmarks/bench_synth_ceiling.py [--patients 2000] [--seed 42] [--logistic]
    .venv/bin/python benchmarks/bench_synth_ceiling.py --run RUN      # + what RUN's teacher knows

Rows (validation and test, LEADER protocol: each patient's last visit, threshold tuned on validation):
- oracle: the generator's own medication marginals for each visit, estimated by re-drawing the visit's
  prescription 300 times from its TRUE state (active families, profile, previous medications). No model
  trained on this data can expect to beat it; it is the Bayes ceiling up to Monte Carlo error.
- frequency baseline on codes (what `evaluate --baseline` reports) and on codes + each diagnosis's TRUE
  family (perfect semantics handed to the baseline, as an extra feature per family present).
- `--logistic`: one-vs-rest logistic regression (C = 0.3) on codes vs on families instead of family
  codes: an ID model against the same model with perfect semantic grouping.
- `--run RUN`: the tuned teacher scores one-diagnosis prompts; a code's family counts as known when the
  family whose medication classes get the highest mean probability is its true family.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

import leader_edge.data.synth as synth
from leader_edge.evaluation import metrics
from leader_edge.evaluation.baselines import fit_frequency_baseline, labels, visit_features
from leader_edge.data.dataset import Dataset
from leader_edge.data.splits import Sample, dataset_splits


def generate_with_states(config: synth.SynthConfig) -> tuple[synth.Cohort, list[tuple]]:
    """The cohort plus, per visit in generation order, the state its medications were drawn from."""
    states: list[tuple] = []
    draw = synth._visit_medications

    def recording(rng, world, active, profile, previous, cfg):
        states.append((np.array(active), profile, None if previous is None else previous.copy()))
        return draw(rng, world, active, profile, previous, cfg)

    synth._visit_medications = recording
    try:
        cohort = synth.generate_cohort(config)
    finally:
        synth._visit_medications = draw
    return cohort, states


def oracle_proba(cohort, states, samples: list[Sample], med_codes: list[str], config, repeats: int = 300) -> np.ndarray:
    """[N, M] Monte Carlo marginals of each sample's target visit from its true generator state."""
    world, rng = cohort.world, np.random.default_rng(0)
    visit_index = {str(h): i for i, h in enumerate(cohort.hadm_ids)}
    column = {c: j for j, c in enumerate(med_codes)}
    to_vocab = np.array([column[c] for c in world.med_codes])
    out = np.zeros((len(samples), len(med_codes)))
    for i, s in enumerate(samples):
        active, profile, previous = states[visit_index[s.target.visit_id]]
        counts = np.zeros(len(world.med_codes))
        for _ in range(repeats):
            counts[synth._visit_medications(rng, world, active, profile, previous, config)] += 1
        out[i, to_vocab] = counts / repeats
    return out


def family_of(world) -> dict[str, str]:
    return {world.dx_codes[i]: f"F{f}" for f, idx in enumerate(world.family_dx) for i in idx}


def with_families(ds: Dataset, family: dict[str, str], *, keep_codes: bool) -> Dataset:
    visits = [dataclasses.replace(v, diagnoses=tuple(sorted(
        ({c for c in v.diagnoses} if keep_codes else {c for c in v.diagnoses if c not in family})
        | {family[c] for c in v.diagnoses if c in family}))) for v in ds.visits]
    return dataclasses.replace(ds, visits=visits)


def scored(name: str, y: dict, p: dict) -> dict:
    t = metrics.tune_threshold(y["val"], p["val"])
    return {"model": name, **{k: metrics.score(y[k], p[k], t) for k in ("val", "test")}}


def baseline_row(ds: Dataset, name: str) -> dict:
    splits = dataset_splits(ds, seed=42)
    model, _, _ = fit_frequency_baseline(ds, splits)
    return scored(name, {k: labels(splits[k], model.med_codes) for k in ("val", "test")},
                  {k: model.predict_proba(splits[k]) for k in ("val", "test")})


def logistic_row(ds: Dataset, name: str) -> dict:
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression

    splits = dataset_splits(ds, seed=42, train_all_visits=True)

    def feats(s: Sample) -> list[str]:
        prev = s.visits[-2] if len(s.visits) > 1 else None
        return visit_features(s.target, prev) + [f"{k}={v}" for k, v in s.target.profile] + [f"visits>1:{prev is not None}"]

    vocab: dict[str, int] = {}
    for s in splits["train"]:
        for f in feats(s):
            vocab.setdefault(f, len(vocab))

    def matrix(samples: list[Sample]):
        rows = [[vocab[f] for f in feats(s) if f in vocab] for s in samples]
        r = np.repeat(np.arange(len(rows)), [len(x) for x in rows])
        return sparse.csr_matrix((np.ones(len(r)), (r, np.concatenate(rows))), shape=(len(rows), len(vocab)))

    meds = ds.vocab("medication")
    x = {k: matrix(v) for k, v in splits.items()}
    y = {k: labels(v, meds) for k, v in splits.items()}
    p = {k: np.zeros(y[k].shape) for k in ("val", "test")}
    for j in range(len(meds)):
        if y["train"][:, j].min() == y["train"][:, j].max():
            for k in p:
                p[k][:, j] = float(y["train"][0, j])
            continue
        fit = LogisticRegression(C=0.3, max_iter=500).fit(x["train"], y["train"][:, j])
        for k in p:
            p[k][:, j] = fit.predict_proba(x[k])[:, 1]
    return scored(name, {k: y[k] for k in p}, p)


def teacher_family_accuracy(run: str, cohort, ds: Dataset) -> list[tuple[str, int, float]]:
    from datetime import datetime
    from pathlib import Path

    import torch

    from leader_edge.data.dataset import Visit
    from leader_edge.train.teacher_data import encode_prompt, pad_batch
    from leader_edge.train.teacher_model import TeacherModel

    world = cohort.world
    model = TeacherModel.load(Path(run) / "teacher")
    column = {c: j for j, c in enumerate(model.med_codes)}
    family_meds = [[column[world.med_codes[i]] for i in idx] for idx in world.family_meds]
    train = {s.patient_id for s in dataset_splits(ds, seed=42)["train"]}
    seen: dict[str, int] = {}
    for v in ds.visits:
        if v.patient_id in train:
            for c in v.diagnoses:
                seen[c] = seen.get(c, 0) + 1
    codes = [(world.dx_codes[i], f, k < synth.SynthConfig().head_codes) for f, idx in enumerate(world.family_dx) for k, i in enumerate(idx)]
    prompts = [encode_prompt(ds, Sample("p", (Visit("p", "v", datetime(2100, 1, 1), (c,), (), (), ()),)), model.tokenizer,
                             max_history=3, max_tokens=320) for c, _, _ in codes]
    probs = []
    with torch.no_grad():
        for start in range(0, len(prompts), 64):
            ids, lengths = pad_batch(prompts[start:start + 64], model.tokenizer.pad_token_id)
            probs.append(torch.sigmoid(model(model.lower(ids, lengths), lengths)).numpy())
    p = np.concatenate(probs)
    guess = np.stack([p[:, m].mean(1) for m in family_meds], 1).argmax(1)
    truth = np.array([f for _, f, _ in codes])
    head = np.array([h for _, _, h in codes])
    count = np.array([seen.get(c, 0) for c, _, _ in codes])
    groups = (("head codes", head), ("tail, seen >= 5 times", ~head & (count >= 5)),
              ("tail, seen 1-4 times", ~head & (count > 0) & (count < 5)), ("tail, unseen", ~head & (count == 0)))
    return [(name, int(m.sum()), float(np.mean(guess[m] == truth[m])) if m.any() else float("nan")) for name, m in groups]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--logistic", action="store_true", help="also fit the logistic rows (~1 min at 2,000 patients)")
    ap.add_argument("--run", help="a run directory whose teacher's family knowledge to probe (same synth settings)")
    args = ap.parse_args()
    config = synth.SynthConfig(patients=args.patients, seed=args.seed)
    start = time.perf_counter()
    cohort, states = generate_with_states(config)
    ds = synth.cohort_dataset(cohort)
    family = family_of(cohort.world)
    splits = dataset_splits(ds, seed=42)
    meds = ds.vocab("medication")
    rows = [scored("oracle (generator marginals)", {k: labels(splits[k], meds) for k in ("val", "test")},
                   {k: oracle_proba(cohort, states, splits[k], meds, config) for k in ("val", "test")}),
            baseline_row(ds, "frequency baseline, codes"),
            baseline_row(with_families(ds, family, keep_codes=True), "frequency baseline, codes + true families")]
    if args.logistic:
        rows += [logistic_row(ds, "logistic, codes"), logistic_row(with_families(ds, family, keep_codes=False), "logistic, true families")]
    print(f"synth: {args.patients:,} patients, seed {args.seed}; {time.perf_counter() - start:.0f} s\n")
    print("| model | val Jaccard | val PRAUC | test Jaccard | test PRAUC | test F1 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['val']['jaccard']:.4f} | {r['val']['prauc']:.4f} | {r['test']['jaccard']:.4f} | "
              f"{r['test']['prauc']:.4f} | {r['test']['f1']:.4f} |")
    if args.run:
        print("\n| diagnosis codes | n | teacher's top-1 family accuracy |\n|---|---|---|")
        for name, n, acc in teacher_family_accuracy(args.run, cohort, ds):
            print(f"| {name} | {n} | {acc:.3f} |")


if __name__ == "__main__":
    main()
