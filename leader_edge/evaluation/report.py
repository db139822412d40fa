"""`leader-edge evaluate --run RUN`: compare every model of a run on the test split, across seeds.

    write_report(run_dir)            # data directory and protocol taken from RUN/run.json
    write_report(run_dir, data_dir)

Writes RUN/report.md, RUN/metrics.json, RUN/training-curves.png and RUN/metrics-by-group.png.
Models: the frequency baseline (fitted here on the run's training split), student-nodistill,
student and teacher. A student trained with several seeds (`train --seeds K`) has one directory
per seed (RUN/student, RUN/student.seed-43, ...); every model is scored from its
`predictions-test.csv` with the same code: the recommended set as written (threshold tuned on
validation), the same probabilities at the fixed thresholds 0.5 and 0.3 of the published tables,
PRAUC from the written scores (4 decimals).

What the numbers are:
- per model and group, the point estimate over every test patient, averaged over seeds, ± the
  std across seeds (no ± with one seed);
- the protocol's own figure (LEADER / SafeDrug: mean ± std over 10 draws of 80% of the patients
  with replacement) for the first seed, so rows can be set beside published tables;
- paired comparisons over the same test patients: the per-patient difference of two models, each
  averaged over its seeds, with a 95% paired bootstrap interval over patients (seeds pooled) and,
  where a model has several seeds, a second one that also resamples the training seeds (the spread
  between training runs, which the first does not carry: on 8,000 held-out patients a change of RNG
  draws alone moved a distilled - labels-only difference by 0.004 PRAUC); "beyond noise" when every
  interval given excludes 0 on the same side.
Groups: overall, single-visit patients, multi-visit patients, and visits with a rare diagnosis
(a diagnosis seen in fewer than `RARE_BELOW` training visits).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np

from leader_edge.evaluation import metrics
from leader_edge.evaluation.baselines import fit_frequency_baseline
from leader_edge.data.dataset import Dataset, load_dataset
from leader_edge.data.splits import Sample, dataset_splits, get_protocol
from leader_edge.errors import StateError
from leader_edge.files import atomic_write_text, sha256
from leader_edge.bedside.recs import prediction_matrices, read_predictions

log = logging.getLogger(__name__)

MODELS = ("frequency", "student-nodistill", "student", "teacher")
GROUPS = ("overall", "single_visit", "multi_visit", "rare_diagnosis")
FIXED_THRESHOLDS = (0.5, 0.3)  # SafeDrug / LEADER's teacher, and LEADER's student
RARE_BELOW = 5  # a diagnosis seen in fewer training visits is "rare"
COMPARED = ("jaccard", "prauc", "f1")
# (a, b): is a better than b? The distilled student against everything, then the labels-only student
# against counting and the teacher (does the teacher's knowledge need distilling at all?), the teacher
# against counting: every pair of the four models.
COMPARISONS = (("student", "student-nodistill"), ("student", "frequency"), ("student", "teacher"),
               ("student-nodistill", "frequency"), ("student-nodistill", "teacher"), ("teacher", "frequency"))
THRESHOLD_LABELS = {"tuned": "tuned on validation", "as_written": "as written"}  # the rows before the fixed ones


def _check_digests(directory: Path, metrics_json: dict, stage: str) -> None:
    """Refuse a stage directory whose predictions, weights or config differ from the sha256 its
    stage recorded (a damaged or edited file was reported as if it were the model's). Files without a
    recorded digest (runs from before it was recorded) pass; the large teacher features are checked
    where they are read (`stage_files.load_teacher_features`)."""
    files = metrics_json.get("files") if isinstance(metrics_json, dict) else None
    for name, want in (files or {}).items():
        path = directory / name
        if name in ("predictions-test.csv", "model.safetensors", "config.json") and (not path.is_file() or sha256(path) != want):
            raise StateError(f"{path} is missing or does not match the sha256 its stage recorded in metrics.json "
                             f"(damaged or edited); re-run `leader-edge train --stage {stage}`")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise StateError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); re-run the stage that wrote it") from None


def seed_dirs(run_dir: Path, name: str, first_seed: int, seeds: list[int] | None = None) -> dict[int, Path]:
    """training seed -> directory of one model's runs: RUN/<name> (the run's seed) and RUN/<name>.seed-N,
    only the `seeds` the run was trained with (RUN/run.json) when given: directories of an earlier
    run with other seeds are left out (and logged), never pooled."""
    out = {}
    if (run_dir / name).is_dir():
        out[int(_read_json(run_dir / name / "metrics.json").get("train_seed", first_seed))] = run_dir / name
    for d in sorted(run_dir.glob(f"{name}.seed-*")):
        m = re.fullmatch(re.escape(name) + r"\.seed-(-?\d+)", d.name)
        if m and d.is_dir():
            out[int(m.group(1))] = d
    if seeds is not None:
        stale = sorted(set(out) - set(seeds))
        if stale:
            log.warning("%s: seed(s) %s are not in this run's seeds %s (an earlier run?); left out", name, stale, seeds)
        out = {k: v for k, v in out.items() if k in seeds}
    return dict(sorted(out.items()))


def _model_matrices(path: Path, test: list[Sample], med_codes: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """(y_pred, y_prob) of a predictions-test.csv in test-sample order."""
    preds = {(p.patient_id, p.visit_id): p for p in read_predictions(path)}
    missing = [s for s in test if (s.patient_id, s.target.visit_id) not in preds]
    if missing:
        raise StateError(f"{path} lacks {len(missing)} test visit(s) (e.g. {missing[0].patient_id}/{missing[0].target.visit_id}); "
                           "it was written for another dataset, split seed or protocol - retrain, or pass the run's --data")
    return prediction_matrices([preds[(s.patient_id, s.target.visit_id)] for s in test], med_codes)


def group_masks(ds: Dataset, splits: dict[str, list[Sample]], test: list[Sample] | None = None,
                test_ds: Dataset | None = None) -> dict[str, np.ndarray]:
    """[N samples] bool per group (see the module docstring) for `test` (default: splits["test"]);
    visit counts come from `test_ds` (default `ds`), rare diagnoses from `ds`'s training split."""
    test = splits["test"] if test is None else test
    n_visits = {pid: len(v) for pid, v in (test_ds or ds).patients().items()}
    multi = np.array([n_visits[s.patient_id] > 1 for s in test], dtype=bool)
    train_ids = {s.patient_id for s in splits["train"]}
    seen = Counter(c for v in ds.visits if v.patient_id in train_ids for c in set(v.diagnoses))
    rare = np.array([any(seen[c] < RARE_BELOW for c in s.target.diagnoses) for s in test], dtype=bool)
    return {"overall": np.ones(len(test), dtype=bool), "single_visit": ~multi, "multi_visit": multi, "rare_diagnosis": rare}


def score_models(run_dir: Path, ds: Dataset, splits: dict[str, list[Sample]], *, protocol, seeds: list[int],
                 rounds_seed: int = 0) -> tuple[dict[str, dict], dict[str, dict]]:
    """Score every model and seed of RUN on the test split.

    Returns:
        (models, per_unit): models[name] = {"seeds", "groups" (group -> metric -> {"mean", "std",
        "by_seed"}), "protocol_groups" (first seed, the protocol's mean ± std), "thresholds",
        size/speed info}; per_unit[name][group][metric] = [S, U] per-patient values for pairing.
    """
    med_codes = ds.vocab("medication")
    ddi = metrics.ddi_matrix(ds.ddi, med_codes) if ds.ddi else None  # no ddi.csv pairs: DDI rate NaN, not 0
    test = splits["test"]
    index = {c: j for j, c in enumerate(med_codes)}
    y_true = np.zeros((len(test), len(med_codes)), dtype=bool)
    for i, s in enumerate(test):
        y_true[i, [index[c] for c in s.target.medications]] = True
    units = np.unique([s.patient_id for s in test], return_inverse=True)[1]
    masks = group_masks(ds, splits)
    models: dict[str, dict] = {}
    per_unit: dict[str, dict] = {}
    for name in MODELS:
        runs: list[tuple[int | None, np.ndarray, np.ndarray | None, dict]] = []
        if name == "frequency":
            model, threshold, _ = fit_frequency_baseline(ds, splits)
            prob = model.predict_proba(test)
            runs.append((None, prob >= threshold, prob, {"n_params": int(model.cooc.size + model.count.size), "threshold": threshold}))
        else:
            dirs = seed_dirs(run_dir, name, seeds[0], seeds) if name != "teacher" else (
                {seeds[0]: run_dir / "teacher"} if (run_dir / "teacher").is_dir() else {})
            for seed, d in dirs.items():
                if not (d / "predictions-test.csv").exists():
                    log.info("%s: no predictions-test.csv; left out of the report", d)
                    continue
                if not (d / "metrics.json").exists():  # written last: without it the stage did not finish
                    log.warning("%s: no metrics.json, its stage did not finish; left out of the report", d)
                    continue
                m = _read_json(d / "metrics.json")
                _check_digests(d, m, "teacher" if name == "teacher" else "student")
                y_pred, y_prob = _model_matrices(d / "predictions-test.csv", test, med_codes)
                info = {k: m.get(k) for k in ("n_params", "inference_ms_per_patient", "threshold", "best_epoch", "train_seconds")}
                if isinstance(info["n_params"], dict):  # the teacher reports {"total", "trainable"}
                    info["n_params"] = info["n_params"].get("total")
                runs.append((seed, y_pred, y_prob, info))
        if not runs:
            continue
        by_seed, fixed, values = [], {t: [] for t in ("tuned", *map(str, FIXED_THRESHOLDS))}, []
        for seed, y_pred, y_prob, _ in runs:
            pv = metrics.per_visit_metrics(y_true, y_prob, y_pred, ddi)
            by_seed.append(metrics.by_masks(pv, masks, rounds=protocol.rounds, frac=protocol.frac, seed=rounds_seed,
                                            units=units))
            values.append({g: {k: metrics.unit_values(pv[k][mask], np.unique(units[mask], return_inverse=True)[1])
                               for k in COMPARED} for g, mask in masks.items()})
            fixed["tuned"].append(metrics.point_estimate(pv, units))
            at = (at_fixed_thresholds(y_true, y_prob, ddi, units) if y_prob is not None
                  else {str(t): fixed["tuned"][-1] for t in FIXED_THRESHOLDS})
            for t, row in at.items():
                fixed[t].append(row)
        groups = {}
        for g in GROUPS:
            groups[g] = {"n": int(by_seed[0][g]["n"][0])}
            for k in metrics.METRICS:
                pts = [b[g]["point"][k] for b in by_seed]
                groups[g][k] = {"mean": float(np.mean(pts)), "std": float(np.std(pts)) if len(pts) > 1 else None,
                                "by_seed": [round(p, 5) for p in pts]}
        info = runs[0][3]
        models[name] = {
            "seeds": [s for s, *_ in runs],
            "groups": groups,
            "protocol_groups": by_seed[0],
            "thresholds": {t: {k: float(np.mean([f[k] for f in fixed[t]])) for k in THRESHOLD_METRICS} for t in fixed},
            **info,
        }
        per_unit[name] = {g: {k: np.stack([v[g][k] for v in values]) for k in COMPARED} for g in GROUPS}
    return models, per_unit


THRESHOLD_METRICS = ("jaccard", "f1", "ddi_rate", "n_med")  # PRAUC does not depend on the threshold


def threshold_rows(label: str, per_visit: dict, y_true: np.ndarray, y_prob: np.ndarray, ddi: np.ndarray | None,
                   units: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """The recommended sets' row (`label`: "tuned" or "as_written", see THRESHOLD_LABELS; from
    `per_visit`, the metrics of those sets) and then the same scores cut at each fixed threshold."""
    point = metrics.point_estimate(per_visit, units)
    return {label: {k: point[k] for k in THRESHOLD_METRICS}, **at_fixed_thresholds(y_true, y_prob, ddi, units)}


def at_fixed_thresholds(y_true: np.ndarray, y_prob: np.ndarray, ddi: np.ndarray | None,
                        units: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """The same probabilities cut at each of `FIXED_THRESHOLDS`, so rows can be set beside published tables.

    Args:
        y_true: [N visits, M codes] bool; y_prob: [N, M] scores; ddi: [M, M] bool or None;
        units: [N] patient index per visit (the protocol's averaging unit) or None (visits).

    Returns:
        {"0.5": {"jaccard", "f1", "ddi_rate", "n_med"}, "0.3": {...}}: point estimates over every unit.
    """
    out = {}
    for t in FIXED_THRESHOLDS:
        # No probabilities in: PRAUC does not depend on the cut, and THRESHOLD_METRICS leaves it out.
        point = metrics.point_estimate(metrics.per_visit_metrics(y_true, None, y_prob >= t, ddi), units)
        out[str(t)] = {k: float(point[k]) for k in THRESHOLD_METRICS}
    return out


def compare(per_unit: dict[str, dict], *, seed: int = 0, seeds: dict[str, list[int]] | None = None) -> list[dict]:
    """Paired 95% bootstrap intervals of a - b for `COMPARISONS` present in the run, every group and metric.

    `seeds` (model -> its training seeds, in per_unit's row order): two models' runs are drawn as
    pairs only when they were trained with the same seeds; otherwise each model's seeds are drawn on
    their own (a seed missing from one model must not pair seed 43 with 44). None: rows pair by position.
    """
    out = []
    for a, b in COMPARISONS:
        if a not in per_unit or b not in per_unit:
            continue
        for g in GROUPS:
            for k in COMPARED:
                ua, ub = per_unit[a][g][k], per_unit[b][g][k]
                d, lo, hi = metrics.paired_interval(ua, ub, seed=seed)
                slo, shi = lo, hi
                if max(len(ua), len(ub)) > 1:
                    same = None if seeds is None else seeds.get(a) == seeds.get(b)
                    _, slo, shi = metrics.paired_interval(ua, ub, seed=seed, resample_seeds=True, paired_seeds=same)
                verdict = (f"{a} better" if min(lo, slo) > 0 else f"{b} better" if max(hi, shi) < 0 else "within noise")
                out.append({"a": a, "b": b, "group": g, "metric": k, "diff": d, "low": lo, "high": hi,
                            "seed_low": slo, "seed_high": shi, "verdict": verdict, "seeds": [len(ua), len(ub)]})
    return out


def goals(comparisons: list[dict]) -> list[dict]:
    """The beat-counting goal: distilled student above the baseline and above the labels-only
    student, PRAUC and Jaccard, overall and single-visit, each interval's low end above 0."""
    out = []
    for b in ("frequency", "student-nodistill"):
        for g in ("overall", "single_visit"):
            for k in ("prauc", "jaccard"):
                c = next((c for c in comparisons if (c["a"], c["b"], c["group"], c["metric"]) == ("student", b, g, k)), None)
                low = None if c is None else round(min(c["low"], c.get("seed_low", c["low"])), 4)
                out.append({"check": f"student - {b}, {k}, {g.replace('_', '-')}", "low": low,
                            "passed": None if low is None or np.isnan(low) else bool(low > 0)})
    return out


def _cell(g: dict, k: str) -> str:
    m = g[k]
    if m["mean"] is None or np.isnan(m["mean"]):
        return "-"
    return f"{m['mean']:.4f}" + ("" if m["std"] is None else f" ± {m['std']:.4f}")


def _num(v: float | None, digits: int = 4) -> str:
    return "-" if v is None or np.isnan(v) else f"{v:.{digits}f}"


def _difference(c: dict) -> str:
    """a - b, its interval with patients resampled and, after `/`, with training seeds resampled too."""
    return (f"{c['diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]"
            + (f" / [{c['seed_low']:+.4f}, {c['seed_high']:+.4f}]" if max(c["seeds"]) > 1 and "seed_low" in c else ""))


def _by_pair(comparisons: list[dict]) -> dict[tuple, dict]:
    """(a, b, group) -> metric -> comparison, in COMPARISONS order."""
    rows: dict[tuple, dict] = {}
    for c in comparisons:
        rows.setdefault((c["a"], c["b"], c["group"]), {})[c["metric"]] = c
    return rows


def _in_words(a: str, b: str, g: str, cs: dict) -> str:
    beyond = [f"{k} {cs[k]['diff']:+.4f} ({cs[k]['verdict']})" for k in COMPARED if cs[k]["verdict"] != "within noise"]
    within = [k for k in COMPARED if cs[k]["verdict"] == "within noise"]
    text = "; ".join(beyond) if beyond else "no difference beyond noise"
    return f"{a} vs {b}, {g.replace('_', '-')}: {text}" + (f"; within noise: {', '.join(within)}" if beyond and within else "") + "."


def render_markdown(models: dict[str, dict], comparisons: list[dict], goal: list[dict], run_dir: Path, data_dir: Path,
                    protocol, seeds: list[int]) -> str:
    lines = [f"# Evaluation of `{run_dir}`", "", f"Data: `{data_dir}`. {protocol.describe()}.",
             f"Training seeds: {', '.join(map(str, seeds))} (students; the teacher and the baseline are trained once). "
             "Cells: the value over every test patient, mean ± std across seeds (no ± with one seed).", ""]
    for group in GROUPS:
        n = next(iter(models.values()))["groups"][group]["n"] if models else 0
        lines += [f"## {group.replace('_', '-')} ({n} patients)", "",
                  "| model | seeds | Jaccard | PRAUC | F1 | DDI rate | #Med |", "|---|---|---|---|---|---|---|"]
        for name, m in models.items():
            g = m["groups"][group]
            lines.append(f"| {name} | {len(m['seeds'])} | " + " | ".join(_cell(g, k) for k in metrics.METRICS) + " |")
        lines.append("")
    lines += ["## Paired comparisons (same test patients, 95% bootstrap intervals)", "",
              "Each cell: the difference, its interval with patients resampled (seeds pooled), and after `/` the "
              "interval with patients and training seeds resampled (shown where a model has several seeds).", "",
              "| a - b | group | Jaccard | PRAUC | F1 |", "|---|---|---|---|---|"]
    rows = _by_pair(comparisons)
    for (a, b, g), cs in rows.items():
        cells = [_difference(c) + ("" if c["verdict"] == "within noise" else " *") for c in (cs[k] for k in COMPARED)]
        lines.append(f"| {a} - {b} | {g.replace('_', '-')} | " + " | ".join(cells) + " |")
    lines += ["", "`*`: every interval excludes 0 on the same side (beyond noise). In words:", ""]
    lines += [f"- {_in_words(a, b, g, cs)}" for (a, b, g), cs in rows.items()]
    lines += ["", "## Goal: the distilled student beats counting and the labels-only student", "",
              "| check | interval low end | passed |", "|---|---|---|"]
    for c in goal:
        low = "-" if c["low"] is None else f"{c['low']:+.4f}"
        passed = "n/a" if c["passed"] is None else ("yes" if c["passed"] else "NO")
        lines.append(f"| {c['check']} | {low} | {passed} |")
    lines += ["", "## Thresholds (overall, mean over seeds)", "",
              "| model | threshold | Jaccard | F1 | DDI rate | #Med |", "|---|---|---|---|---|---|"]
    for name, m in models.items():
        for t, v in m["thresholds"].items():
            lines.append(f"| {name} | {THRESHOLD_LABELS.get(t, t)} | {_num(v['jaccard'])} | {_num(v['f1'])} | "
                         f"{_num(v['ddi_rate'])} | {_num(v['n_med'], 2)} |")
    lines += ["", f"## The {protocol.name} protocol's figure (first seed)", "",
              "| model | group | Jaccard | PRAUC | F1 | DDI rate | #Med |", "|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        for g in ("overall", "single_visit", "multi_visit"):
            st = m["protocol_groups"][g]
            lines.append(f"| {name} | {g.replace('_', '-')} | " + " | ".join(
                "-" if np.isnan(st[k][0]) else f"{st[k][0]:.4f} ± {st[k][1]:.4f}" for k in metrics.METRICS) + " |")
    lines += ["", "## Size and speed", "", "| model | parameters (inference) | ms per patient (batch 1) |", "|---|---|---|"]
    for name, m in models.items():
        ms, n_params = m.get("inference_ms_per_patient"), m.get("n_params")
        lines.append(f"| {name} | {'-' if n_params is None else f'{n_params:,}'} | {'-' if ms is None else f'{ms:.2f}'} |")
    missing = [n for n in MODELS if n not in models]
    if missing:
        lines += ["", f"Not trained in this run: {', '.join(missing)}."]
    lines += ["", "Plots: `training-curves.png`, `metrics-by-group.png` (one colour per model in both).", ""]
    return "\n".join(lines)


def threshold_table(rows: dict[str, dict[str, dict]]) -> str:
    """Plain text: rows[model][threshold] = {"jaccard", "f1", "ddi_rate", "n_med"} (None or NaN: "-")."""
    head = f"{'model':<22} {'threshold':<20} {'Jaccard':>8} {'F1':>8} {'DDI rate':>8} {'#Med':>6}"
    lines = [head, "-" * len(head)]
    for name, by_t in rows.items():
        for t, v in by_t.items():
            lines.append(f"{name:<22} {THRESHOLD_LABELS.get(t, t):<20} {_num(v['jaccard']):>8} {_num(v['f1']):>8} "
                         f"{_num(v['ddi_rate']):>8} {_num(v['n_med'], 2):>6}")
    return "\n".join(lines)


def summary_table(result: dict) -> str:
    """Plain text for a terminal, from `write_report`'s result (or RUN/metrics.json): the protocol and
    seeds; per group every model x metric; every paired comparison with both intervals and its verdict;
    the goal checks; the tuned / 0.5 / 0.3 threshold rows."""
    lines = [f"{result['protocol']['description']}; training seeds {', '.join(map(str, result['seeds']))} "
             "(students; the teacher and the baseline are trained once)",
             "cells: the value over every test patient, mean ± std across seeds (no ± with one seed)"]
    models = result["models"]
    head = f"{'model':<18} {'seeds':>5}  " + " ".join(f"{h:<17}" for h in ("Jaccard", "PRAUC", "F1", "DDI rate", "#Med"))
    for g in GROUPS:
        n = next(iter(models.values()))["groups"][g]["n"] if models else 0
        lines += ["", f"{g.replace('_', '-')} ({n} patients)", head, "-" * len(head)]
        lines += [f"{name:<18} {len(m['seeds']):>5}  " + " ".join(f"{_cell(m['groups'][g], k):<17}" for k in metrics.METRICS)
                  for name, m in models.items()]
    lines += ["", "paired differences a - b over the same test patients: 95% interval with patients resampled "
              "(seeds pooled) / with patients and training seeds resampled; 'better' only when every interval excludes 0"]
    by_group: dict[str, list[str]] = {}
    for (a, b, g), cs in _by_pair(result["comparisons"]).items():
        by_group.setdefault(g, []).extend(f"  {a + ' - ' + b:<31} {k:<8} {_difference(cs[k]):<50} {cs[k]['verdict']}"
                                          for k in COMPARED)
    for g, rows in by_group.items():
        lines += [g.replace("_", "-"), *rows]
    if result.get("goal"):
        w = max(len(c["check"]) for c in result["goal"])
        lines += ["", "goal: the distilled student beats counting and the labels-only student (interval low end > 0)"]
        lines += [f"  {c['check']:<{w}} {'-' if c['low'] is None else format(c['low'], '+.4f'):>8}  "
                  f"{'n/a' if c['passed'] is None else 'yes' if c['passed'] else 'NO'}" for c in result["goal"]]
    lines += ["", "thresholds (overall, mean over seeds): the recommended sets as tuned on validation, and the same "
              "probabilities at the published tables' fixed thresholds",
              threshold_table({name: m["thresholds"] for name, m in models.items()})]
    return "\n".join(lines)


def report_files(run_dir: Path) -> str:
    """Where `write_report` put its files, in one line."""
    return (f"report: {run_dir / 'report.md'}; plots: {run_dir / 'training-curves.png'}, "
            f"{run_dir / 'metrics-by-group.png'}; metrics: {run_dir / 'metrics.json'}")


def write_report(run_dir: Path, data_dir: Path | None = None, *, protocol: str | None = None) -> dict:
    """Score every model of RUN on the test split; write report.md, metrics.json and two PNGs.

    Args:
        run_dir: a run directory from `leader-edge train`.
        data_dir: the dataset; defaults to RUN/run.json's "data".
        protocol: must match the run's (RUN/run.json "protocol"); None takes it from there.

    Returns:
        The dict written to RUN/metrics.json: {"data", "seed", "seeds", "protocol", "models",
        "comparisons", "goal"}.

    Raises:
        RuntimeError: no data directory known, a protocol other than the run's, or a predictions
            file that does not match the split.
    """
    from leader_edge.evaluation.report_plots import plot_metrics_by_group, plot_training_curves

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StateError(f"{run_dir} is not a run directory; train one with `leader-edge train --data DIR --out {run_dir}`")
    run = _read_json(run_dir / "run.json")
    shape = {"data": str, "seed": int, "seeds": list, "protocol": str}
    wrong = [k for k, t in shape.items() if k in run and not isinstance(run[k], t)] if isinstance(run, dict) else ["(the file)"]
    if wrong:  # {"data": 5} was a TypeError traceback
        raise StateError(f"{run_dir}/run.json is damaged ({', '.join(wrong)} not as `train` writes it); re-run "
                         f"`leader-edge train` into a new --out, or pass --data DIR")
    if data_dir is None:
        if "data" not in run:
            raise StateError(f"{run_dir}/run.json names no data directory; pass --data DIR")
        data_dir = Path(run["data"])
    run_protocol = run.get("protocol", "leader")
    if protocol is not None and protocol != run_protocol:
        raise StateError(f"{run_dir} was trained under the {run_protocol} protocol (its splits and test samples); "
                           f"evaluate it with --protocol {run_protocol}, or retrain with `leader-edge train --protocol {protocol}`")
    proto = get_protocol(run_protocol)
    data_dir = Path(data_dir)
    seed = int(run.get("seed", 42))
    seeds = [int(s) for s in run.get("seeds", [seed])]
    ds = load_dataset(data_dir)
    splits = dataset_splits(ds, seed=seed, protocol=proto)
    models, per_unit = score_models(run_dir, ds, splits, protocol=proto, seeds=seeds)
    comparisons = compare(per_unit, seeds={name: m["seeds"] for name, m in models.items()})
    goal = goals(comparisons)
    result = metrics.json_ready({"data": str(data_dir.resolve()), "seed": seed, "seeds": seeds,
                          "protocol": {"name": proto.name, "description": proto.describe()},
                          "models": models, "comparisons": comparisons, "goal": goal})
    plot_training_curves(run_dir, run_dir / "training-curves.png")
    plot_metrics_by_group(result["models"], run_dir / "metrics-by-group.png", GROUPS)
    atomic_write_text(run_dir / "report.md", render_markdown(models, comparisons, goal, run_dir, data_dir, proto, seeds))
    atomic_write_text(run_dir / "metrics.json", json.dumps(result, indent=2) + "\n")
    return result
