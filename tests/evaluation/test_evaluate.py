import json
import random
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from leader_edge.evaluation.baselines import FrequencyBaseline, fit_frequency_baseline, labels
from leader_edge.cli import main
from leader_edge.data.dataset import Dataset, Visit, write_dataset
from leader_edge.data.splits import Sample, dataset_splits
from leader_edge.evaluation.metrics import score, tune_threshold


def tiny_dataset(patients: int = 80, seed: int = 0) -> Dataset:
    """Three disease families: diagnosis dF_k -> medications MF_0..MF_2 (mostly); chronic MC carries over."""
    rng = random.Random(seed)
    visits = []
    t0 = datetime(2130, 1, 1)
    for p in range(patients):
        fam = rng.randrange(3)
        chronic = rng.random() < 0.5
        for k in range(1 if rng.random() < 0.6 else 3):
            dx = [f"d{fam}_{rng.randrange(4)}", f"x{rng.randrange(20)}"]
            meds = {f"M{fam}_{j}" for j in range(3) if rng.random() < 0.85} | {f"N{rng.randrange(5)}"}
            if chronic and k > 0:
                meds.add("MC")
            visits.append(Visit(f"p{p}", f"v{p}_{k}", t0 + timedelta(days=30 * k), tuple(dx), (f"pr{fam}",), tuple(sorted(meds)),
                                (("insurance", "a"),)))
    return Dataset(visits=visits, ddi=[("M0_0", "M0_1"), ("M1_0", "N1")])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tiny_dataset(), tmp_path_factory.mktemp("d") / "data", source="test")


def test_frequency_baseline_hand_worked_mean():
    v = lambda i, dx, meds: Visit("p", f"v{i}", datetime(2130, 1, 1 + i), dx, (), meds)  # noqa: E731
    a, b = v(0, ("d1",), ("A",)), v(1, ("d1", "d2"), ("A", "B"))
    ds = Dataset(visits=[a, b])
    model = FrequencyBaseline.fit(ds, [Sample("p", (a, b))], rule="mean", smoothing=0.0)
    # features: prior (2 visits: A 2, B 1), d1 (2: A 2, B 1), d2 (1: A 1, B 1), m:A (1: A 1, B 1)
    # target b with history a: features prior, d1, d2, m:A -> A: (1+1+1+1)/4, B: (.5+.5+1+1)/4
    prob = model.predict_proba([Sample("p", (a, b))])
    np.testing.assert_allclose(prob, [[1.0, 0.75]])
    model.set_rule("max", 0.0)
    np.testing.assert_allclose(model.predict_proba([Sample("p", (a,))]), [[1.0, 0.5]])
    with pytest.raises(ValueError, match="unknown rule"):
        model.set_rule("median", 1.0)


def test_frequency_baseline_beats_prior_on_families():
    ds = tiny_dataset()
    splits = dataset_splits(ds, seed=1)
    model, threshold, trials = fit_frequency_baseline(ds, splits)
    assert len(trials) == 12 and {t["rule"] for t in trials} == {"mean", "max", "noisy_or", "specificity"}
    y = labels(splits["test"], model.med_codes)
    ours = score(y, model.predict_proba(splits["test"]), threshold)
    prior = labels(splits["train"], model.med_codes).mean(0)  # the same score for every visit
    base = score(y, np.broadcast_to(prior, y.shape), 0.5)
    # measured: jaccard 0.66 vs 0.0, PRAUC 0.75 vs 0.33 (family meds at 85%, one random med per visit)
    assert ours["jaccard"] > 0.5 > base["jaccard"]
    assert ours["prauc"] > base["prauc"] + 0.3


def test_frequency_baseline_beats_tuned_prior_on_synth():
    from leader_edge.data.synth import synth_dataset

    ds = synth_dataset(patients=500, seed=1)
    splits = dataset_splits(ds)
    model, threshold, _ = fit_frequency_baseline(ds, splits)
    y = labels(splits["test"], model.med_codes)
    ours = score(y, model.predict_proba(splits["test"]), threshold)
    prior = labels(splits["train"], model.med_codes).mean(0)
    y_val = labels(splits["val"], model.med_codes)
    t_prior = tune_threshold(y_val, np.broadcast_to(prior, y_val.shape))
    base = score(y, np.broadcast_to(prior, y.shape), t_prior)
    # measured after the synth noise retune (e1bc723): jaccard 0.425 vs 0.361, PRAUC 0.597 vs 0.519
    assert ours["jaccard"] > base["jaccard"] + 0.04
    assert ours["prauc"] > base["prauc"] + 0.04


def test_evaluate_baseline_cli_table_and_json(data_dir, tmp_path):
    out = tmp_path / "m.json"
    r = CliRunner().invoke(main, ["evaluate", "--baseline", "frequency", "--data", str(data_dir), "--seed", "3", "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert "single_visit" in r.stdout and "multi_visit" in r.stdout and "+-" in r.stdout
    got = json.loads(out.read_text())
    assert got["groups"]["overall"]["n"] == 8
    assert 0 < got["groups"]["overall"]["jaccard"]["mean"] <= 1
    assert got["groups"]["overall"]["ddi_rate"]["mean"] is not None
    # the tuned row is the table's point estimate; 0.5 and 0.3 cut the same probabilities
    assert list(got["thresholds"]) == ["tuned", "0.5", "0.3"]
    assert got["thresholds"]["tuned"]["jaccard"] == pytest.approx(got["groups"]["overall"]["point"]["jaccard"])
    assert got["thresholds"]["0.3"]["n_med"] >= got["thresholds"]["0.5"]["n_med"]
    assert "tuned on validation" in r.stdout


def _write_truth_and_recs(tmp_path, rows, header="patient_id,visit_id,medications,scores"):
    truth = tmp_path / "visits.csv"
    truth.write_text(
        "patient_id,visit_id,visit_time,diagnoses,procedures,medications\n"
        "p1,a,2130-01-01,d,,A;B\np1,b,2130-02-01,d,,A\np2,c,2130-01-01,d,,B;C\np3,e,2130-01-01,d,,C\n"
    )
    recs = tmp_path / "recs.csv"
    recs.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    ddi = tmp_path / "ddi.csv"
    ddi.write_text("med_a,med_b\nA,C\n")
    return truth, recs, ddi


def _two_predictions(tmp_path):
    """visits.csv (p1: a, b; p2: c; p3: e) with predictions for b and c only."""
    return _write_truth_and_recs(tmp_path, ["p1,b,A;C,A:0.9;C:0.8", "p2,c,B;C,B:0.7;C:0.6;A:0.1"])


def _run_eval(*args):
    return CliRunner().invoke(main, ["evaluate", *map(str, args)])


def _eval_json(tmp_path, *args):
    """Run `evaluate ARGS --output o.json`, require exit 0; (metrics JSON, result)."""
    out = tmp_path / "o.json"
    r = _run_eval(*args, "--output", out)
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text()), r


def test_evaluate_file_counts_missing_visits_as_empty(tmp_path):
    # LEADER protocol: the last visits b, c, e are scored; e has no prediction.
    # b (multi-visit patient p1): true {A}, pred {A,C}, A .9 C .8 -> Jaccard 1/2, F1 2/3, PRAUC 1
    # c (single):                 true {B,C}, pred {B,C}          -> Jaccard 1,   F1 1,   PRAUC 1
    # e (single, missing):        true {C}, nothing scored: every code tied at 0 over {A,B,C} -> PRAUC 1/3
    truth, recs, ddi = _two_predictions(tmp_path)
    out = tmp_path / "o.json"
    r = _run_eval("--truth", truth, "--predictions", recs, "--ddi", ddi, "--rounds", "1", "--output", out)
    assert r.exit_code == 0, r.output
    assert "1 of 3 scored visits" in r.stderr and "empty predictions" in r.stderr
    got = json.loads(out.read_text())
    assert got["visits_without_prediction"] == 1 and got["missing_counted_as_empty"] and got["protocol"] == "leader"
    g = got["groups"]
    assert g["overall"]["point"]["jaccard"] == pytest.approx(0.5)
    assert g["overall"]["point"]["f1"] == pytest.approx((2 / 3 + 1) / 3)
    assert g["overall"]["point"]["prauc"] == pytest.approx((1 + 1 + 1 / 3) / 3)
    assert g["multi_visit"]["point"]["jaccard"] == pytest.approx(0.5)
    assert g["single_visit"]["point"]["jaccard"] == pytest.approx(0.5)
    assert g["multi_visit"]["point"]["ddi_rate"] == pytest.approx(1.0)  # the pair (A, C) interacts
    # opting out leaves e out
    r = _run_eval("--truth", truth, "--predictions", recs, "--skip-missing", "--output", out)
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["groups"]["overall"]["point"]["jaccard"] == pytest.approx(0.75)


def test_evaluate_file_prauc_ranks_over_the_label_space(tmp_path):
    truth, recs, _ = _two_predictions(tmp_path)
    space = tmp_path / "meds.txt"
    space.write_text("A\nB\nC\nD\n")
    got, _ = _eval_json(tmp_path, "--truth", truth, "--predictions", recs, "--label-space", space)
    assert got["label_space_size"] == 4
    assert got["groups"]["overall"]["point"]["prauc"] == pytest.approx((1 + 1 + 1 / 4) / 3)  # e: C tied with 3 others
    space.write_text("A\nB\n")  # C is recommended but outside: refused, never dropped
    r = _run_eval("--truth", truth, "--predictions", recs, "--label-space", space)
    assert r.exit_code == 2 and "not in the label space" in r.output


def test_evaluate_file_prauc_ranks_over_a_dataset_directory_label_space(tmp_path):
    truth, recs, _ = _two_predictions(tmp_path)
    visits = [Visit("q", "v0", datetime(2130, 1, 1), ("d",), (), ("A", "B", "C"))]
    data = write_dataset(Dataset(visits=visits, names={"medication": {"D": "only in codes.csv"}}), tmp_path / "data", source="test")
    got, _ = _eval_json(tmp_path, "--truth", truth, "--predictions", recs, "--label-space", data)
    assert got["label_space_size"] == 4  # A, B, C from visits.csv and D from codes.csv
    assert got["groups"]["overall"]["point"]["prauc"] == pytest.approx((1 + 1 + 1 / 4) / 3)  # e: C tied with 3 others


def test_evaluate_file_prauc_ranks_over_a_bundle_label_space(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bedside"))
    from test_runtime import MEDS, write_fake_bundle  # the hand-built bundle of the runtime tests (~0.2 s)

    bundle = write_fake_bundle(tmp_path / "bundle")
    truth = tmp_path / "visits.csv"  # _two_predictions with A, B, C renamed to the bundle's M1, M2, M3; e also takes Z9
    truth.write_text("patient_id,visit_id,visit_time,diagnoses,procedures,medications\n"
                     "p1,a,2130-01-01,d,,M1;M2\np1,b,2130-02-01,d,,M1\np2,c,2130-01-01,d,,M2;M3\np3,e,2130-01-01,d,,M3;Z9\n")
    recs = tmp_path / "recs.csv"
    recs.write_text("patient_id,visit_id,medications,scores\np1,b,M1;M3,M1:0.9;M3:0.8\np2,c,M2;M3,M2:0.7;M3:0.6;M1:0.1\n")
    got, r = _eval_json(tmp_path, "--truth", truth, "--predictions", recs, "--label-space", bundle)
    assert got["label_space_size"] == len(MEDS) + 1  # the bundle's 6 codes and Z9, which no model can rank
    assert "1 true medication code(s) are outside the label space" in r.stderr
    # e: two positives (M3, Z9) among 7 codes all scored 0: precision 2/7 at every recall
    assert got["groups"]["overall"]["point"]["prauc"] == pytest.approx((1 + 1 + 2 / 7) / 3)
    recs.write_text("patient_id,visit_id,medications,scores\np1,b,A,A:0.9\n")  # a code the bundle cannot write
    r = _run_eval("--truth", truth, "--predictions", recs, "--label-space", bundle)
    assert r.exit_code == 2 and "not in the label space" in r.output


def test_evaluate_file_fixed_threshold_rows(tmp_path):
    # LEADER protocol scores b, c, e (e has no prediction: empty at every threshold):
    #        as written          at 0.5              at 0.3
    # b {A}: {A}   J 1  F1 1     {A}   J 1   F1 1    {A,C} J 1/2 F1 2/3  (C 0.4)
    # c {B,C}: {B,C} J 1 F1 1    {C}   J 1/2 F1 2/3  {B,C} J 1   F1 1    (B 0.45)
    truth, recs, ddi = _write_truth_and_recs(tmp_path, ["p1,b,A,A:0.9;C:0.4", "p2,c,B;C,B:0.45;C:0.6"])
    got, r = _eval_json(tmp_path, "--truth", truth, "--predictions", recs, "--ddi", ddi, "--rounds", "1")
    t = got["thresholds"]
    assert list(t) == ["as_written", "0.5", "0.3"]
    assert [t[k]["jaccard"] for k in t] == pytest.approx([2 / 3, 1.5 / 3, 1.5 / 3])
    assert [t[k]["f1"] for k in t] == pytest.approx([2 / 3, (1 + 2 / 3) / 3, (2 / 3 + 1) / 3])
    assert [t[k]["n_med"] for k in t] == pytest.approx([1, 2 / 3, 4 / 3])
    assert t["as_written"]["jaccard"] == pytest.approx(got["groups"]["overall"]["point"]["jaccard"])
    assert t["as_written"]["ddi_rate"] == 0 and t["0.3"]["ddi_rate"] > 0  # b's {A, C} interacts at 0.3
    table = r.stdout[r.stdout.index("fixed thresholds"):].splitlines()
    assert [line.split()[1:3] for line in table[3:]] == [["as", "written"], ["0.5", "0.5000"], ["0.3", "0.5000"]]
    # the SafeDrug protocol averages per patient: p1 (a: nothing predicted, b), p2 (c), p3 (e)
    got, _ = _eval_json(tmp_path, "--truth", truth, "--predictions", recs, "--protocol", "safedrug", "--rounds", "1")
    assert got["thresholds"]["0.3"]["jaccard"] == pytest.approx(((0 + 0.5) / 2 + 1 + 0) / 3)


def test_evaluate_three_column_truth_takes_groups_from_the_visits(tmp_path):
    truth, recs, _ = _two_predictions(tmp_path)
    targets = tmp_path / "targets.csv"
    targets.write_text("patient_id,visit_id,medications\np1,b,A\np2,c,B;C\n")
    g = _eval_json(tmp_path, "--truth", targets, "--visits", truth, "--predictions", recs)[0]["groups"]
    assert g["multi_visit"]["n"] == 1 and g["single_visit"]["n"] == 1  # p1 has history in visits.csv
    assert g["overall"]["point"]["jaccard"] == pytest.approx(0.75)
    got, r = _eval_json(tmp_path, "--truth", targets, "--predictions", recs)
    assert "pass --visits" in r.stdout and list(got["groups"]) == ["overall"]


def test_evaluate_safedrug_protocol_scores_every_visit_per_patient(tmp_path):
    # every visit is scored; a has no prediction (empty -> Jaccard 0); patient means, then the mean:
    # p1 (0 + 1/2) / 2, p2 1, p3 0 (missing) -> (1/4 + 1 + 0) / 3
    truth, recs, _ = _two_predictions(tmp_path)
    out = tmp_path / "o.json"
    r = _run_eval("--truth", truth, "--predictions", recs, "--protocol", "safedrug", "--output", out)
    assert r.exit_code == 0, r.output
    got = json.loads(out.read_text())
    assert got["protocol"] == "safedrug" and got["visits_scored"] == 4
    assert got["groups"]["overall"]["point"]["jaccard"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert got["groups"]["overall"]["n"] == 3  # patients, not visits
    assert "protocol safedrug" in r.stdout


def test_evaluate_refuses_output_over_an_input(tmp_path):
    truth, recs, _ = _write_truth_and_recs(tmp_path, ["p1,b,A,A:0.9"])
    before = truth.read_bytes()
    r = _run_eval("--truth", truth, "--predictions", recs, "--output", truth)
    assert r.exit_code == 2 and "one of the input files" in r.output
    assert truth.read_bytes() == before


def test_evaluate_refuses_output_inside_the_data_or_run_directory(data_dir, tmp_path):
    """--out data/visits.csv replaced the dataset with a JSON, exit 0; --out RUN/run.json the run."""
    before = (data_dir / "visits.csv").read_bytes()
    for out in (data_dir / "visits.csv", data_dir / "new.json"):
        r = _run_eval("--baseline", "frequency", "--data", data_dir, "--output", out)
        assert r.exit_code == 2 and "lies in the dataset directory" in r.output, r.output
    assert (data_dir / "visits.csv").read_bytes() == before and not (data_dir / "new.json").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    r = _run_eval("--run", run, "--output", run / "run.json")
    assert r.exit_code == 2 and "lies in the run directory" in r.output and (run / "run.json").read_text() == "{}"


def test_evaluate_file_without_scores_has_no_prauc(tmp_path):
    truth, recs, _ = _write_truth_and_recs(tmp_path, ["p1,a,A;B", "p1,b,A", "p2,c,B;C", "p3,e,C"], header="patient_id,visit_id,medications")
    r = CliRunner().invoke(main, ["evaluate", "--truth", str(truth), "--predictions", str(recs)])
    assert r.exit_code == 0, r.output
    assert "PRAUC not computed" in r.stdout
    assert "1.0000 +- 0.0000" in r.stdout and "no prediction" not in r.stderr
    assert "fixed thresholds" not in r.stdout  # no scores to cut


def test_evaluate_file_unknown_visit_names_line(tmp_path):
    truth, recs, _ = _write_truth_and_recs(tmp_path, ["p1,b,A,", "p9,zz,A,"])
    r = CliRunner().invoke(main, ["evaluate", "--truth", str(truth), "--predictions", str(recs)])
    assert r.exit_code == 2
    assert "line 3" in r.output and "'zz' is not in" in r.output and "Traceback" not in r.output


def test_evaluate_rejects_mixed_modes(data_dir, tmp_path):
    r = CliRunner().invoke(main, ["evaluate", "--baseline", "frequency", "--run", str(tmp_path)])
    assert r.exit_code == 2 and "exactly one" in r.output
    r = CliRunner().invoke(main, ["evaluate", "--baseline", "frequency"])
    assert r.exit_code == 2 and "--data" in r.output


def test_evaluate_run_without_run_json_is_clear(tmp_path):
    r = CliRunner().invoke(main, ["evaluate", "--run", str(tmp_path)])
    assert r.exit_code == 2 and "not a trained run" in r.output


def test_evaluate_visits_give_history_but_truth_gives_the_scored_rows(tmp_path):
    truth, recs, _ = _two_predictions(tmp_path)
    last_only = tmp_path / "last.csv"  # a visits file holding only p1's last visit b and p2's c
    last_only.write_text("patient_id,visit_id,visit_time,diagnoses,procedures,medications\n"
                         "p1,b,2130-02-01,d,,A\np2,c,2130-01-01,d,,B;C\n")
    got, _ = _eval_json(tmp_path, "--truth", last_only, "--visits", truth, "--predictions", recs, "--protocol", "safedrug")
    assert got["visits_scored"] == 2  # the truth's rows, not every visit of --visits
    assert got["groups"]["multi_visit"]["n"] == 1  # p1's history comes from --visits


def test_evaluate_names_what_scores_zero_without_a_word(tmp_path):
    """A row without scores among scored ones, a recommended code without a score, and a true visit
    without medication were all scored 0 silently (PRAUC 0.7685 instead of 0.8796 on one such file)."""
    truth, recs, _ = _write_truth_and_recs(tmp_path, ["p1,b,A;C,", "p2,c,B;C;Z,B:0.7;C:0.6;A:0.1", "p3,e,C,C:0.9"])
    truth.write_text(truth.read_text().replace("p3,e,2130-01-01,d,,C", "p3,e,2130-01-01,d,,"))
    r = _run_eval("--truth", truth, "--predictions", recs)
    assert r.exit_code == 0, r.output
    assert "1 prediction row(s) recommend medications but carry no scores (first: line 2)" in r.output
    assert "1 recommended code(s) have no score (first: 'Z' on line 3)" in r.output
    assert "1 scored visit(s) have no true medication" in r.output
    (tmp_path / "clean").mkdir()
    clean, recs2, _ = _write_truth_and_recs(tmp_path / "clean", ["p1,b,A,A:0.9", "p2,c,B,B:0.7", "p3,e,C,C:0.9"])
    r = _run_eval("--truth", clean, "--predictions", recs2)
    assert r.exit_code == 0 and "no score" not in r.output and "carry no scores" not in r.output, r.output


def test_evaluate_file_title_says_what_is_scored_not_a_split(tmp_path):
    """The --truth title said "patients split 0.8:0.1:0.1 (seeded shuffle)": no split is made there."""
    truth, recs, _ = _two_predictions(tmp_path)
    r = _run_eval("--truth", truth, "--predictions", recs)
    assert r.exit_code == 0 and "every patient in the file; scored: each patient's last visit" in r.output, r.output
    targets = tmp_path / "targets.csv"
    targets.write_text("patient_id,visit_id,medications\np1,b,A\np2,c,B;C\n")
    r = _run_eval("--truth", targets, "--predictions", recs)
    assert r.exit_code == 0 and "every row of targets.csv scored as given" in r.output, r.output
    assert "patients split" not in r.output
