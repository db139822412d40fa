"""`leader-edge evaluate`: score a recommendations file, the frequency baseline, or a trained run."""

from __future__ import annotations

import json
from pathlib import Path

import click

from leader_edge.cli import user_errors
from leader_edge.errors import ConfigError, DataError, StateError


@click.command()
@click.option("--truth", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The true medications: a visits.csv, or patient_id,visit_id,medications (every row a scored visit).")
@click.option("--predictions", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Recommendations CSV: patient_id,visit_id,medications[,scores].")
@click.option("--visits", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="visits.csv of the scored patients (history included): the single/multi-visit groups "
                   "[default: --truth when it is a visits file].")
@click.option("--label-space", type=click.Path(exists=True, path_type=Path),
              help="The medication vocabulary PRAUC ranks over: a dataset directory, a bundle directory, or a "
                   "file with one code per line [default: the codes found in --truth and --predictions].")
@click.option("--skip-missing", is_flag=True,
              help="Leave out scored visits that have no prediction (default: they count as empty predictions).")
@click.option("--ddi", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="ddi.csv (med_a,med_b) for the DDI rate.")
@click.option("--baseline", type=click.Choice(["frequency"]), help="Fit a baseline on train, tune on val, score test.")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), envvar="LEADER_EDGE_DATA",
              help="Dataset directory (for --baseline; optional for --run).")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A run directory from `leader-edge train`: write its report.")
@click.option("--protocol", type=click.Choice(["leader", "safedrug"]),
              help="leader: last visit per patient, mean +- std over 10 x 80% of visits; safedrug: every visit, "
                   "averaged per patient, 10 x 80% of patients [default: leader; --run: the run's].")
@click.option("--seed", type=int, default=42, show_default=True,
              help="Split seed (--baseline) and subsample seed (--baseline, --truth; --run takes the run's).")
@click.option("--rounds", type=click.IntRange(min=1),
              help="Subsamples for mean +- std [default: the protocol's, 10; --run: the protocol's].")
@click.option("--out", "--output", "output", type=click.Path(dir_okay=False, path_type=Path), help="Also write the metrics as JSON here.")
@user_errors
def evaluate(truth, predictions, visits, label_space, skip_missing, ddi, baseline, data, run_dir, protocol, seed, rounds,
             output) -> None:
    """Score medication recommendations: Jaccard, PRAUC, F1, DDI rate, #Med over every scored
    visit (the point estimate) and as mean +- std over 10 random 80% subsamples, overall and for
    single- vs multi-visit patients. The protocol is named in every table and metrics file. Where
    there are scores, the same scores cut at 0.5 and 0.3 (the published tables' thresholds) are
    given beside the recommended sets (overall, point estimates; JSON "thresholds").

    \b
    Examples:
      leader-edge evaluate --truth data/visits.csv --predictions recs.csv --ddi data/ddi.csv --label-space bundle
      leader-edge evaluate --truth targets.csv --visits data/visits.csv --predictions recs.csv
      leader-edge evaluate --baseline frequency --data data/synth --out baseline.json
      leader-edge evaluate --run runs/r1
    """
    modes = [name for name, on in (("--truth/--predictions", truth or predictions), ("--baseline", baseline), ("--run", run_dir)) if on]
    if len(modes) != 1:
        raise click.UsageError("give exactly one of --truth with --predictions, --baseline frequency --data DIR, or --run RUN"
                               + (f" (got {', '.join(modes)})" if modes else ""))
    if output is not None:
        inputs = [p for p in (truth, predictions, visits, ddi) if p is not None]
        if any(output.resolve() == p.resolve() for p in inputs):
            raise click.UsageError(f"--out {output} is one of the input files; choose another path")
        for directory, what in ((run_dir, "the run directory"), (data, "the dataset directory")):
            if directory is not None and output.resolve().is_relative_to(directory.resolve()):
                # run.json, a model's predictions or visits.csv replaced by this JSON: the run or dataset was lost
                raise click.UsageError(f"--out {output} lies in {what} {directory}, whose files are the inputs "
                                       "(a run also gets its report there); choose a path outside it")
    if run_dir is not None:
        result = _evaluate_run(run_dir, data, protocol)
        from leader_edge.evaluation.report import report_files, summary_table

        click.echo(summary_table(result))
        click.echo(report_files(run_dir), err=True)
    else:
        from leader_edge.data.splits import get_protocol

        proto = get_protocol(protocol or "leader")
        rounds = rounds or proto.rounds
        if truth or predictions:
            if not (truth and predictions):
                raise click.UsageError("--truth and --predictions go together")
            result = _evaluate_file(truth, predictions, visits, label_space, ddi, proto, seed, rounds, skip_missing)
        else:
            if data is None:
                raise click.UsageError("--baseline needs --data DIR")
            result = _evaluate_baseline(data, proto, seed, rounds)
        from leader_edge.evaluation.metrics import format_table

        click.echo(format_table(result["groups"], title=result["title"]))
        if result.get("thresholds"):
            from leader_edge.evaluation.report import threshold_table

            click.echo("\noverall, the same scores at the published tables' fixed thresholds (value over every scored patient):")
            click.echo(threshold_table({predictions.name if predictions else "frequency": result["thresholds"]}))
        click.echo("cells: value over every scored patient (mean +- std over the protocol's subsamples)", err=True)
    if output is not None:
        _write_json(output, result)
        click.echo(f"wrote {output}", err=True)


def _read_targets(truth: Path):
    """(targets, visits or None): the scored rows of a truth file. A visits file gives visits too;
    a patient_id,visit_id,medications file gives its rows as Prediction tuples."""
    from leader_edge.bedside.csv_checks import iter_csv_rows
    from leader_edge.data.dataset import read_visits
    from leader_edge.bedside.recs import read_predictions

    header = next(iter_csv_rows(truth))[1]["__header__"]
    if "visit_time" in header:
        return None, read_visits(truth)
    return read_predictions(truth), None


def _label_space(path: Path) -> list[str]:
    """Medication codes of a dataset directory, a bundle directory or a one-code-per-line file."""
    if path.is_dir():
        if (path / "visits.csv").is_file():
            from leader_edge.data.dataset import load_dataset

            return load_dataset(path).vocab("medication")
        if (path / "manifest.json").is_file():
            from leader_edge.bedside.runtime import Bundle

            return list(Bundle.load(path).med_codes)
        raise DataError(path, "neither a dataset (visits.csv) nor a bundle (manifest.json) directory",
                        fix="pass a dataset directory, a bundle directory or a file with one medication code per line")
    codes = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if codes and codes[0] in ("code", "medication"):  # a one-column CSV with a header
        codes = codes[1:]
    if not codes or len(set(codes)) != len(codes):
        raise DataError(path, "no codes" if not codes else "a code appears twice",
                        fix="write one medication code per line, each once")
    return codes


def _evaluate_file(truth: Path, predictions: Path, visits_path: Path | None, label_space: Path | None, ddi_path: Path | None,
                   proto, seed: int, rounds: int, skip_missing: bool) -> dict:
    import numpy as np

    from leader_edge.data.dataset import read_ddi, read_visits
    from leader_edge.evaluation.metrics import by_group, ddi_matrix, per_visit_metrics
    from leader_edge.bedside.recs import Prediction, prediction_matrices, predicted_codes, read_predictions

    rows, truth_visits = _read_targets(truth)
    # what the title says is scored: a targets file's rows as they are, a visits file's by the protocol
    scoring = proto.describe(split=False) if rows is None else (
        f"protocol {proto.name}: every row of {truth.name} scored as given"
        + ("; averaged per patient" if proto.per_patient else ""))
    # --visits gives the patients' histories (groups, known ids); the scored rows always come from --truth.
    visits = read_visits(visits_path) if visits_path is not None else truth_visits
    if rows is None:
        # A visits file: LEADER scores each patient's last visit, SafeDrug every visit.
        last: dict[str, object] = {}
        for v in truth_visits:
            last[v.patient_id] = v
        scored = truth_visits if proto.eval_all_visits else list(last.values())
        rows = [Prediction(v.patient_id, v.visit_id, v.medications) for v in scored]
    n_visits: dict[str, int] = {}
    for v in visits or ():
        n_visits[v.patient_id] = n_visits.get(v.patient_id, 0) + 1
    targets = {r.visit_id: r for r in rows}
    preds = read_predictions(predictions)
    if not preds:
        raise DataError(predictions, "no predictions in the file", fix="write one row per visit to score")
    known = {v.visit_id: v.patient_id for v in visits} if visits else {r.visit_id: r.patient_id for r in rows}
    by_id = {}
    for p in preds:
        if p.visit_id not in known:
            raise DataError(predictions, f"visit_id {p.visit_id!r} is not in {visits_path or truth}", line=p.line, column="visit_id",
                            fix="score predictions against the visits file they were made for")
        if known[p.visit_id] != p.patient_id:
            raise DataError(predictions, f"visit {p.visit_id!r} belongs to patient {known[p.visit_id]!r}, not {p.patient_id!r}",
                            line=p.line, column="patient_id", fix="check the patient ids")
        by_id[p.visit_id] = p
    notes = []
    outside = sum(1 for vid in by_id if vid not in targets)
    if outside:
        notes.append(f"{outside} prediction(s) for visits the {proto.name} protocol does not score were ignored")
    missing = [r for r in rows if r.visit_id not in by_id]
    if missing:
        what = "left out (--skip-missing)" if skip_missing else "scored as empty predictions"
        click.echo(f"{len(missing)} of {len(rows)} scored visits in {truth} have no prediction: {what}", err=True)
        if skip_missing:
            rows = [r for r in rows if r.visit_id in by_id]
    has_scores = preds[0].scores is not None
    scored_preds = [by_id.get(r.visit_id) or Prediction(r.patient_id, r.visit_id, (), {} if has_scores else None) for r in rows]
    notes += _silent_zeros(rows, [by_id[r.visit_id] for r in rows if r.visit_id in by_id], has_scores)
    truth_codes = {c for r in rows for c in r.medications}
    if label_space is not None:
        med_codes = _label_space(label_space)
        space = set(med_codes)
        wrong = sorted(predicted_codes(scored_preds) - space)
        if wrong:
            raise DataError(predictions, f"{len(wrong)} recommended or scored code(s) are not in the label space {label_space}, "
                            f"e.g. {wrong[:3]}", fix="pass the label space of the model that wrote the predictions")
        unknown = sorted(truth_codes - space)
        if unknown:
            click.echo(f"{len(unknown)} true medication code(s) are outside the label space {label_space} (e.g. {unknown[:3]}); "
                       "they count as positives no model can rank", err=True)
            med_codes = med_codes + unknown
    else:
        med_codes = sorted(truth_codes | predicted_codes(scored_preds))
        notes.append(f"PRAUC ranks over the {len(med_codes)} codes found in the files (pass --label-space for the model's vocabulary)")
    index = {c: j for j, c in enumerate(med_codes)}
    y_true = np.zeros((len(rows), len(med_codes)), dtype=bool)
    for i, r in enumerate(rows):
        y_true[i, [index[c] for c in r.medications]] = True
    y_pred, y_prob = prediction_matrices(scored_preds, med_codes)
    ddi = ddi_matrix(read_ddi(ddi_path), med_codes) if ddi_path is not None else None
    per_visit = per_visit_metrics(y_true, y_prob, y_pred, ddi)
    units = np.unique([r.patient_id for r in rows], return_inverse=True)[1] if proto.per_patient else None
    thresholds = {}
    if y_prob is None:
        notes.append("no scores column: PRAUC not computed")
    else:  # the recommended sets as written, then the same scores cut at 0.5 and 0.3 (published tables' thresholds)
        from leader_edge.evaluation.report import threshold_rows

        thresholds = threshold_rows("as_written", per_visit, y_true, y_prob, ddi, units)
    if ddi is None:
        notes.append("no --ddi: DDI rate not computed")
    if visits:
        groups = by_group(per_visit, np.array([n_visits.get(r.patient_id, 1) > 1 for r in rows]), rounds=rounds,
                          frac=proto.frac, seed=seed, units=units)
    else:
        groups = {"overall": by_group(per_visit, np.zeros(len(rows), dtype=bool), rounds=rounds, frac=proto.frac, seed=seed,
                                      units=units)["overall"]}
        notes.append("single/multi-visit groups need the patients' visits: pass --visits visits.csv")
    return {
        "title": f"{predictions.name} vs {truth.name}: {len(rows)} visits; {scoring}" + "".join(f"; {n}" for n in notes),
        "protocol": proto.name,
        "source": {"truth": str(truth), "predictions": str(predictions), "ddi": str(ddi_path) if ddi_path else None,
                   "visits": str(visits_path) if visits_path else None, "label_space": str(label_space) if label_space else None},
        "visits_scored": len(rows),
        "visits_without_prediction": len(missing),
        "missing_counted_as_empty": bool(missing) and not skip_missing,
        "label_space_size": len(med_codes),
        "groups": groups,
        "thresholds": thresholds,
    }


def _silent_zeros(rows: list, preds: list, has_scores: bool) -> list[str]:
    """Notes for what the metrics score as 0 without a word otherwise: a prediction row with no
    scores among scored ones (its PRAUC ranks every code at 0), a recommended code without a score
    (ranked at 0; `predict` lists scores down to 0.00005, so only a threshold of ~0 or top_k writes
    one), a true visit with no medication (Jaccard and PRAUC 0 for every model). Each is echoed too."""
    notes = []
    if has_scores:
        unscored = [p for p in preds if not p.scores and p.medications]
        if unscored:
            notes.append(f"{len(unscored)} prediction row(s) recommend medications but carry no scores (first: line "
                         f"{unscored[0].line}); PRAUC ranks every code of those visits at 0")
        bare = [(p, c) for p in preds if p.scores for c in p.medications if c not in p.scores]
        if bare:
            p, c = bare[0]
            notes.append(f"{len(bare)} recommended code(s) have no score (first: {c!r} on line {p.line}); PRAUC ranks "
                         "them at 0")
    empty = sum(1 for r in rows if not r.medications)
    if empty:
        notes.append(f"{empty} scored visit(s) have no true medication: every model scores 0 on them")
    for note in notes:
        click.echo(note, err=True)
    return notes


def _evaluate_baseline(data: Path, proto, seed: int, rounds: int) -> dict:
    import numpy as np

    from leader_edge.evaluation.baselines import fit_frequency_baseline, labels
    from leader_edge.data.dataset import load_dataset
    from leader_edge.data.splits import dataset_splits
    from leader_edge.evaluation.metrics import by_group, ddi_matrix, per_visit_metrics
    from leader_edge.evaluation.report import threshold_rows

    ds = load_dataset(data)
    splits = dataset_splits(ds, seed=seed, protocol=proto)
    if not splits["test"]:
        raise ConfigError(f"{data}: the test split is empty ({len(ds.patients())} patients); use a dataset with at least 10 patients")
    model, threshold, trials = fit_frequency_baseline(ds, splits)
    test = splits["test"]
    prob = model.predict_proba(test)
    y_true = labels(test, model.med_codes)
    ddi = ddi_matrix(ds.ddi, model.med_codes) if ds.ddi else None
    per_visit = per_visit_metrics(y_true, prob, prob >= threshold, ddi)
    n_visits = {pid: len(v) for pid, v in ds.patients().items()}
    multi = np.array([n_visits[s.patient_id] > 1 for s in test])
    units = np.unique([s.patient_id for s in test], return_inverse=True)[1] if proto.per_patient else None
    thresholds = threshold_rows("tuned", per_visit, y_true, prob, ddi, units)
    return {
        "title": f"frequency baseline ({model.rule}, a={model.smoothing}, threshold {threshold:.2f}) on {data}: "
                 f"{len(set(s.patient_id for s in test))} test patients, split seed {seed}; {proto.describe()}",
        "protocol": proto.name,
        "source": {"data": str(data), "baseline": "frequency", "seed": seed},
        "model": {"rule": model.rule, "smoothing": model.smoothing, "threshold": threshold},
        "validation": trials,
        "groups": by_group(per_visit, multi, rounds=rounds, frac=proto.frac, seed=seed, units=units),
        "thresholds": thresholds,
    }


def _evaluate_run(run_dir: Path, data: Path | None, protocol: str | None) -> dict:
    if not (run_dir / "run.json").exists():
        raise StateError(f"{run_dir} has no run.json: it is not a trained run; create one with `leader-edge train --out {run_dir}`")
    from leader_edge.evaluation.report import write_report

    return write_report(run_dir, data, protocol=protocol)


def _write_json(path: Path, result: dict) -> None:
    """Atomic JSON (`metrics.json_ready`: (mean, std) pairs become {"mean", "std"}, NaN becomes null)."""
    from leader_edge.files import atomic_write_text
    from leader_edge.evaluation.metrics import json_ready

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(json_ready(result), indent=2, default=str) + "\n")
