"""`leader-edge evaluate --run RUN`: compare every model of a run on the test split.

    write_report(run_dir)            # data directory taken from RUN/run.json
    write_report(run_dir, data_dir)

Writes RUN/report.md, RUN/metrics.json, RUN/training-curves.png and RUN/metrics-by-group.png.
Models: the frequency baseline (fitted here on the run's training split), student-nodistill,
student and teacher (each read from its `predictions-test.csv` and `metrics.json`; a model whose
directory is missing is listed as not trained). Every model is scored from its predictions file
with the same code: the recommended set as written, PRAUC from the written scores (4 decimals),
LEADER's protocol (mean +- std over 10 random 80% subsamples), overall and for single- vs
multi-visit patients.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from leader_edge import metrics
from leader_edge.baselines import fit_frequency_baseline
from leader_edge.dataset import Dataset, Sample, dataset_splits, load_dataset
from leader_edge.recs import prediction_matrices, read_predictions

log = logging.getLogger(__name__)

MODELS = ("frequency", "student-nodistill", "student", "teacher")
GROUPS = ("overall", "single_visit", "multi_visit")
# The quality bar on the default synth data.
BAR_OVER_BASELINE = 0.05  # student Jaccard >= frequency baseline + 0.05
BAR_TEACHER_GAP = 0.03  # student Jaccard >= teacher - 0.03


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise RuntimeError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); re-run the stage that wrote it") from None


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _model_matrices(run_dir: Path, name: str, test: list[Sample], med_codes: list[str]) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(y_pred, y_prob) of RUN/<name>/predictions-test.csv in test-sample order, or None if absent."""
    path = run_dir / name / "predictions-test.csv"
    if not path.exists():
        return None
    preds = {(p.patient_id, p.visit_id): p for p in read_predictions(path)}
    missing = [s for s in test if (s.patient_id, s.target.visit_id) not in preds]
    if missing:
        raise RuntimeError(f"{path} lacks {len(missing)} test visit(s) (e.g. {missing[0].patient_id}/{missing[0].target.visit_id}); "
                           "it was written for another dataset or split seed - retrain, or pass the run's --data")
    return prediction_matrices([preds[(s.patient_id, s.target.visit_id)] for s in test], med_codes)


def score_models(run_dir: Path, ds: Dataset, splits: dict[str, list[Sample]]) -> dict[str, dict]:
    """Per model: {"groups": group -> metric -> (mean, std), "n_params", "inference_ms_per_patient"}."""
    med_codes = ds.vocab("medication")
    ddi = metrics.ddi_matrix(ds.ddi, med_codes)
    test = splits["test"]
    index = {c: j for j, c in enumerate(med_codes)}
    y_true = np.zeros((len(test), len(med_codes)), dtype=bool)
    for i, s in enumerate(test):
        y_true[i, [index[c] for c in s.target.medications]] = True
    multi = np.array([len(s.visits) > 1 for s in test])
    out: dict[str, dict] = {}
    for name in MODELS:
        if name == "frequency":
            model, threshold, _ = fit_frequency_baseline(ds, splits)
            y_prob = model.predict_proba(test)
            y_pred, info = y_prob >= threshold, {"n_params": int(model.cooc.size + model.count.size), "threshold": threshold}
        else:
            mats = _model_matrices(run_dir, name, test, med_codes)
            if mats is None:
                log.info("%s: no %s/predictions-test.csv; left out of the report", name, name)
                continue
            y_pred, y_prob = mats
            m = _read_json(run_dir / name / "metrics.json")
            info = {k: m.get(k) for k in ("n_params", "inference_ms_per_patient", "threshold", "best_epoch", "train_seconds")}
            if isinstance(info["n_params"], dict):  # the teacher reports {"total", "trainable"}
                info["n_params"] = info["n_params"].get("total")
        per_visit = metrics.per_visit_metrics(y_true, y_prob, y_pred, ddi)
        out[name] = {"groups": metrics.by_group(per_visit, multi), **info}
    return out


def quality_bar(models: dict[str, dict]) -> list[dict]:
    """The issue's checks, each {"check", "value", "target", "passed"} (passed None when a model is missing)."""
    def get(name: str, group: str, metric: str) -> float | None:
        return models[name]["groups"][group][metric][0] if name in models else None

    stu, base = get("student", "overall", "jaccard"), get("frequency", "overall", "jaccard")
    teacher, nod = get("teacher", "overall", "jaccard"), get("student-nodistill", "single_visit", "prauc")
    single = get("student", "single_visit", "prauc")
    checks = [
        ("student Jaccard - frequency Jaccard", None if stu is None else stu - base, f">= {BAR_OVER_BASELINE}", lambda v: v >= BAR_OVER_BASELINE),
        ("teacher Jaccard - student Jaccard", None if stu is None or teacher is None else teacher - stu, f"<= {BAR_TEACHER_GAP}", lambda v: v <= BAR_TEACHER_GAP),
        ("single-visit PRAUC: student - student-nodistill", None if single is None or nod is None else single - nod, ">= 0", lambda v: v >= 0),
    ]
    return [{"check": c, "value": None if v is None else round(v, 4), "target": t, "passed": None if v is None else bool(ok(v))}
            for c, v, t, ok in checks]


def _fmt(mean: float, std: float) -> str:
    return "-" if np.isnan(mean) else f"{mean:.4f} ± {std:.4f}"


def render_markdown(models: dict[str, dict], bar: list[dict], run_dir: Path, data_dir: Path) -> str:
    lines = [f"# Evaluation of `{run_dir}`", "", f"Data: `{data_dir}`. Test split, LEADER protocol: mean ± std over 10 "
             "random 80% subsamples (with replacement); DDI rate pooled over visits.", ""]
    for group in GROUPS:
        n = next(iter(models.values()))["groups"][group]["n"][0] if models else 0
        lines += [f"## {group.replace('_', '-')} ({int(n)} patients)", "",
                  "| model | Jaccard | PRAUC | F1 | DDI rate | #Med |", "|---|---|---|---|---|---|"]
        for name, m in models.items():
            g = m["groups"][group]
            lines.append(f"| {name} | " + " | ".join(_fmt(*g[k]) for k in metrics.METRICS) + " |")
        lines.append("")
    lines += ["## Size and speed", "", "| model | parameters (inference) | ms per patient (batch 1) | threshold |", "|---|---|---|---|"]
    for name, m in models.items():
        ms, n_params, threshold = m.get("inference_ms_per_patient"), m.get("n_params"), m.get("threshold")
        cells = ["-" if n_params is None else f"{n_params:,}", "-" if ms is None else f"{ms:.2f}",
                 "-" if threshold is None else f"{threshold:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    missing = [n for n in MODELS if n not in models]
    if missing:
        lines += ["", f"Not trained in this run: {', '.join(missing)}."]
    lines += ["", "## Quality bar", "", "| check | value | target | passed |", "|---|---|---|---|"]
    for b in bar:
        passed = "n/a" if b["passed"] is None else ("yes" if b["passed"] else "NO")
        value = "-" if b["value"] is None else f"{b['value']:+.4f}"
        lines.append(f"| {b['check']} | {value} | {b['target']} | {passed} |")
    lines += ["", "Plots: `training-curves.png`, `metrics-by-group.png`.", ""]
    return "\n".join(lines)


def plot_training_curves(run_dir: Path, path: Path) -> bool:
    """Validation PRAUC and training loss per epoch of every model with a history; False if none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for name in ("student-nodistill", "student"):
        hist = _read_json(run_dir / name / "history.json")
        if hist:
            curves[name] = ([h["epoch"] for h in hist], [h["val_prauc"] for h in hist], [h["train_loss"] for h in hist])
    teacher = _read_json(run_dir / "teacher" / "metrics.json").get("history") or []
    if teacher:
        curves["teacher"] = ([h["epoch"] for h in teacher], [h.get("val_prauc") for h in teacher], [h.get("loss") for h in teacher])
    if not curves:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, (epochs, prauc, loss) in curves.items():
        ax1.plot(epochs, prauc, marker=".", label=name)
        ax2.plot(epochs, loss, marker=".", label=name)
    ax1.set(title="validation PRAUC", xlabel="epoch")
    ax2.set(title="training loss (student: BCE + distillation terms)", xlabel="epoch", yscale="log")
    ax1.legend()
    fig.tight_layout()
    _save_figure(fig, path)
    return True


def plot_metrics_by_group(models: dict[str, dict], path: Path) -> None:
    """Grouped bars: Jaccard and PRAUC per model, overall / single-visit / multi-visit, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(GROUPS))
    for ax, metric in zip(axes, ("jaccard", "prauc")):
        for i, (name, m) in enumerate(models.items()):
            mean = [m["groups"][g][metric][0] for g in GROUPS]
            std = [m["groups"][g][metric][1] for g in GROUPS]
            ax.bar(x + i * width - 0.4 + width / 2, mean, width, yerr=std, label=name, capsize=2)
        ax.set(title=metric, xticks=x, xticklabels=[g.replace("_", "-") for g in GROUPS], ylim=(0, 1))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(run_dir: Path, data_dir: Path | None = None) -> dict:
    """Score every model of RUN on the test split; write report.md, metrics.json and two PNGs.

    Args:
        run_dir: a run directory from `leader-edge train`.
        data_dir: the dataset; defaults to RUN/run.json's "data".

    Returns:
        The dict written to RUN/metrics.json: {"data", "seed", "models", "quality_bar"}.

    Raises:
        RuntimeError: no data directory known, or a predictions file that does not match the split.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RuntimeError(f"{run_dir} is not a run directory; train one with `leader-edge train --data DIR --out {run_dir}`")
    run = _read_json(run_dir / "run.json")
    if data_dir is None:
        if "data" not in run:
            raise RuntimeError(f"{run_dir}/run.json names no data directory; pass --data DIR")
        data_dir = Path(run["data"])
    data_dir = Path(data_dir)
    seed = int(run.get("seed", 42))
    ds = load_dataset(data_dir)
    splits = dataset_splits(ds, seed=seed)
    models = score_models(run_dir, ds, splits)
    bar = quality_bar(models)
    result = {"data": str(data_dir.resolve()), "seed": seed, "models": models, "quality_bar": bar}
    plot_training_curves(run_dir, run_dir / "training-curves.png")
    plot_metrics_by_group(models, run_dir / "metrics-by-group.png")
    _atomic_write(run_dir / "report.md", render_markdown(models, bar, run_dir, data_dir))
    _atomic_write(run_dir / "metrics.json", json.dumps(result, indent=2) + "\n")
    for name, m in models.items():
        g = m["groups"]["overall"]
        log.info("%-18s Jaccard %s PRAUC %s", name, _fmt(*g["jaccard"]), _fmt(*g["prauc"]))
    return result
