"""`leader-edge evaluate`: score a recommendations file, the frequency baseline, or a trained run."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click

from leader_edge.cli import user_errors


@click.command()
@click.option("--truth", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="visits.csv holding the true medications.")
@click.option("--predictions", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Recommendations CSV: patient_id,visit_id,medications[,scores].")
@click.option("--ddi", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="ddi.csv (med_a,med_b) for the DDI rate.")
@click.option("--baseline", type=click.Choice(["frequency"]), help="Fit a baseline on train, tune on val, score test.")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), envvar="LEADER_EDGE_DATA",
              help="Dataset directory (for --baseline; optional for --run).")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A run directory from `leader-edge train`: write its report.")
@click.option("--seed", type=int, default=42, show_default=True, help="Split seed (--baseline) and subsample seed.")
@click.option("--rounds", type=int, default=10, show_default=True, help="Subsamples for mean +- std (LEADER: 10 x 80%).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Also write the metrics as JSON here.")
@user_errors
def evaluate(truth, predictions, ddi, baseline, data, run_dir, seed, rounds, output) -> None:
    """Score medication recommendations: Jaccard, PRAUC, F1, DDI rate, #Med as mean +- std over
    10 random 80% subsamples, overall and for single- vs multi-visit patients.

    \b
    Examples:
      leader-edge evaluate --truth data/visits.csv --predictions recs.csv --ddi data/ddi.csv
      leader-edge evaluate --baseline frequency --data data/synth --output baseline.json
      leader-edge evaluate --run runs/r1
    """
    modes = [name for name, on in (("--truth/--predictions", truth or predictions), ("--baseline", baseline), ("--run", run_dir)) if on]
    if len(modes) != 1:
        raise click.UsageError("give exactly one of --truth with --predictions, --baseline frequency --data DIR, or --run RUN"
                               + (f" (got {', '.join(modes)})" if modes else ""))
    if run_dir is not None:
        result = _evaluate_run(run_dir, data)
        click.echo(json.dumps(result, indent=2, default=str) if result else f"report written to {run_dir / 'report.md'}")
    else:
        if truth or predictions:
            if not (truth and predictions):
                raise click.UsageError("--truth and --predictions go together")
            result = _evaluate_file(truth, predictions, ddi, seed, rounds)
        else:
            if data is None:
                raise click.UsageError("--baseline needs --data DIR")
            result = _evaluate_baseline(data, seed, rounds)
        from leader_edge.metrics import format_table

        click.echo(format_table(result["groups"], title=result["title"]))
    if output is not None:
        _write_json(output, result)
        click.echo(f"wrote {output}", err=True)


def _evaluate_file(truth: Path, predictions: Path, ddi_path: Path | None, seed: int, rounds: int) -> dict:
    import numpy as np

    from leader_edge.dataset import read_ddi, read_visits
    from leader_edge.errors import DataError
    from leader_edge.metrics import by_group, ddi_matrix, per_visit_metrics
    from leader_edge.recs import prediction_matrices, predicted_codes, read_predictions

    visits = read_visits(truth)
    by_id = {v.visit_id: v for v in visits}
    # read_visits orders each patient's visits by time: a visit has history when it is not first.
    first = {}
    for v in visits:
        first.setdefault(v.patient_id, v.visit_id)
    preds = read_predictions(predictions)
    if not preds:
        raise DataError(predictions, "no predictions in the file", fix="write one row per visit to score")
    for p in preds:
        v = by_id.get(p.visit_id)
        if v is None:
            raise DataError(predictions, f"visit_id {p.visit_id!r} is not in {truth}", line=p.line, column="visit_id",
                            fix="score predictions against the visits file they were made for")
        if v.patient_id != p.patient_id:
            raise DataError(predictions, f"visit {p.visit_id!r} belongs to patient {v.patient_id!r} in {truth}, not {p.patient_id!r}",
                            line=p.line, column="patient_id", fix="check the patient ids")
    missing = len(visits) - len(preds)
    if missing:
        click.echo(f"{missing} of {len(visits)} visits in {truth} have no prediction and are not scored", err=True)
    targets = [by_id[p.visit_id] for p in preds]
    med_codes = sorted({c for v in targets for c in v.medications} | predicted_codes(preds))
    y_true = np.zeros((len(preds), len(med_codes)), dtype=bool)
    index = {c: j for j, c in enumerate(med_codes)}
    for i, v in enumerate(targets):
        y_true[i, [index[c] for c in v.medications]] = True
    y_pred, y_prob = prediction_matrices(preds, med_codes)
    ddi = ddi_matrix(read_ddi(ddi_path), med_codes) if ddi_path is not None else None
    per_visit = per_visit_metrics(y_true, y_prob, y_pred, ddi)
    multi = np.array([first[v.patient_id] != v.visit_id for v in targets])
    notes = [] if y_prob is not None else ["no scores column: PRAUC not computed"]
    if ddi is None:
        notes.append("no --ddi: DDI rate not computed")
    return {
        "title": f"{predictions.name} vs {truth.name}: {len(preds)} visits" + "".join(f"; {n}" for n in notes),
        "source": {"truth": str(truth), "predictions": str(predictions), "ddi": str(ddi_path) if ddi_path else None},
        "visits_scored": len(preds),
        "visits_without_prediction": missing,
        "groups": by_group(per_visit, multi, rounds=rounds, seed=seed),
    }


def _evaluate_baseline(data: Path, seed: int, rounds: int) -> dict:
    import numpy as np

    from leader_edge.baselines import fit_frequency_baseline, labels
    from leader_edge.dataset import dataset_splits, load_dataset
    from leader_edge.metrics import by_group, ddi_matrix, per_visit_metrics

    ds = load_dataset(data)
    splits = dataset_splits(ds, seed=seed)
    if not splits["test"]:
        raise ValueError(f"{data}: the test split is empty ({len(ds.patients())} patients); use a dataset with at least 10 patients")
    model, threshold, trials = fit_frequency_baseline(ds, splits)
    test = splits["test"]
    prob = model.predict_proba(test)
    y_true = labels(test, model.med_codes)
    ddi = ddi_matrix(ds.ddi, model.med_codes) if ds.ddi else None
    per_visit = per_visit_metrics(y_true, prob, prob >= threshold, ddi)
    multi = np.array([bool(s.history) for s in test])
    return {
        "title": f"frequency baseline ({model.rule}, a={model.smoothing}, threshold {threshold:.2f}) on {data}: "
                 f"{len(test)} test patients, split seed {seed}",
        "source": {"data": str(data), "baseline": "frequency", "seed": seed},
        "model": {"rule": model.rule, "smoothing": model.smoothing, "threshold": threshold},
        "validation": trials,
        "groups": by_group(per_visit, multi, rounds=rounds, seed=seed),
    }


def _evaluate_run(run_dir: Path, data: Path | None) -> dict:
    if not (run_dir / "run.json").exists():
        raise RuntimeError(f"{run_dir} has no run.json: it is not a trained run; create one with `leader-edge train --out {run_dir}`")
    try:
        from leader_edge.train.report import write_report
    except ImportError as e:
        raise RuntimeError(
            f"`evaluate --run` needs the student stage's report module (leader_edge.train.report), which is not "
            f"built in this install ({e}); train a run with `leader-edge train` once it is available"
        ) from None
    return write_report(run_dir, data)


def _write_json(path: Path, result: dict) -> None:
    """Atomic JSON: (mean, std) pairs become {"mean", "std"}, NaN becomes null."""

    def clean(x):
        if isinstance(x, dict):
            return {k: int(v[0]) if k == "n" else clean(v) for k, v in x.items()}
        if isinstance(x, tuple) and len(x) == 2 and all(isinstance(v, float) for v in x):
            return {"mean": clean(x[0]), "std": clean(x[1])}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, float) and x != x:
            return None
        return x

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(clean(result), f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
