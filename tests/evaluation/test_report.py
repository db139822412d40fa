"""The evaluation report from fabricated predictions: seeds, paired comparisons, protocols, plots."""

import json

import numpy as np
import pytest

from leader_edge.data.dataset import load_dataset, write_dataset
from leader_edge.data.splits import dataset_splits
from leader_edge.evaluation.metrics import paired_interval
from leader_edge.bedside.recs import write_predictions
from leader_edge.evaluation.report import COMPARISONS, GROUPS, MODELS, goals, summary_table, write_report
from leader_edge.data.synth import synth_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(synth_dataset(patients=200, seed=5), tmp_path_factory.mktemp("d") / "data", source="synth")


def fabricate(run, data, name, *, noise: float, seed: int = 0, protocol: str = "leader", train_seed: int = 42):
    """RUN/<name> with predictions = truth blurred by `noise`, and a metrics.json."""
    ds = load_dataset(data)
    test = dataset_splits(ds, seed=42, protocol=protocol)["test"]
    meds = ds.vocab("medication")
    truth = np.array([[c in s.target.medications for c in meds] for s in test], dtype=float)
    prob = np.clip(truth * (1 - noise) + np.random.default_rng(seed).random(truth.shape) * noise, 0, 1)
    (run / name).mkdir(parents=True)
    write_predictions(run / name / "predictions-test.csv", [s.patient_id for s in test], [s.target.visit_id for s in test],
                      prob, meds, 0.5)
    n_params = {"total": 1234, "trainable": 12} if name == "teacher" else 1234  # the teacher writes both
    (run / name / "metrics.json").write_text(json.dumps({"n_params": n_params, "inference_ms_per_patient": 1.5,
                                                         "threshold": 0.5, "train_seed": train_seed}))


@pytest.fixture(scope="module")
def report_run(data, tmp_path_factory):
    """(RUN, write_report's result): every model, the student with two seeds (~15 s on the 2-core VM, so once)."""
    run = tmp_path_factory.mktemp("run")
    (run / "run.json").write_text(json.dumps({"data": str(data), "seed": 42, "seeds": [42, 43]}))
    fabricate(run, data, "student", noise=0.8, seed=1)
    fabricate(run, data, "student.seed-43", noise=0.8, seed=2, train_seed=43)
    fabricate(run, data, "student-nodistill", noise=0.98, seed=3)
    fabricate(run, data, "teacher", noise=0.6)
    (run / "student" / "history.json").write_text(json.dumps([{"epoch": 1, "train_loss": 0.3, "val_prauc": 0.5},
                                                              {"epoch": 2, "train_loss": 0.2, "val_prauc": 0.6}]))
    return run, write_report(run)


def test_write_report_pools_seeds_and_compares_models(report_run):
    tmp_path, result = report_run
    assert list(result["models"]) == ["frequency", "student-nodistill", "student", "teacher"]
    student = result["models"]["student"]
    assert student["seeds"] == [42, 43] and len(student["groups"]["overall"]["prauc"]["by_seed"]) == 2
    assert student["groups"]["overall"]["prauc"]["std"] > 0  # two different seeds
    assert result["models"]["teacher"]["groups"]["overall"]["prauc"]["std"] is None  # one seed: no spread claimed
    assert set(student["thresholds"]) == {"tuned", "0.5", "0.3"}
    # noise 0.8 vs 0.98: the distilled student must be better beyond noise on PRAUC overall
    c = next(c for c in result["comparisons"] if (c["a"], c["b"], c["group"], c["metric"]) == ("student", "student-nodistill", "overall", "prauc"))
    assert c["low"] > 0 and c["verdict"] == "student better" and c["low"] <= c["diff"] <= c["high"]
    assert result["protocol"]["name"] == "leader" and "protocol leader" in (tmp_path / "report.md").read_text()
    report = (tmp_path / "report.md").read_text()
    assert "| student - student-nodistill | overall |" in report and "rare-diagnosis" in report and "1,234" in report
    assert json.loads((tmp_path / "metrics.json").read_text())["goal"] == result["goal"]
    assert {(c["a"], c["b"]) for c in result["comparisons"]} == set(COMPARISONS)  # every pair of the four models
    assert ("student-nodistill", "teacher") in COMPARISONS  # the issue asks for labels-only vs teacher too
    for png in ("training-curves.png", "metrics-by-group.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_write_report_safedrug_protocol_scores_every_test_visit(data, tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"data": str(data), "seed": 42, "protocol": "safedrug"}))
    fabricate(tmp_path, data, "student", noise=0.5, protocol="safedrug")
    result = write_report(tmp_path)
    ds = load_dataset(data)
    patients = list(ds.patients())
    n_train = int(len(patients) * 2 / 3)
    test_patients = patients[n_train:n_train + int((len(patients) - n_train) / 2)]  # file order, SafeDrug arithmetic
    assert result["models"]["student"]["groups"]["overall"]["n"] == len(test_patients)
    with pytest.raises(RuntimeError, match="safedrug protocol"):
        write_report(tmp_path, protocol="leader")


def test_write_report_refuses_predictions_of_another_split(data, tmp_path):
    fabricate(tmp_path, data, "student", noise=0.2)
    lines = (tmp_path / "student" / "predictions-test.csv").read_text().splitlines()
    (tmp_path / "student" / "predictions-test.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(RuntimeError, match="lacks 1 test visit"):
        write_report(tmp_path, data)
    with pytest.raises(RuntimeError, match="names no data directory"):
        write_report(tmp_path)


def test_paired_interval_hand_worked():
    # a constant difference has a zero-width interval at that difference
    d, lo, hi = paired_interval(np.array([[0.5, 0.6, 0.7]]), np.array([[0.4, 0.5, 0.6]]))
    assert (d, lo, hi) == pytest.approx((0.1, 0.1, 0.1))
    # seeds are averaged per unit before pairing: a = mean([0.2, 0.4]) = 0.3 per unit vs 0.3 -> 0
    d, lo, hi = paired_interval(np.array([[0.2, 0.2], [0.4, 0.4]]), np.array([0.3, 0.3]))
    assert d == pytest.approx(0.0) and lo == pytest.approx(0.0) and hi == pytest.approx(0.0)
    # symmetric noise around 0 gives an interval that contains 0
    rng = np.random.default_rng(0)
    d, lo, hi = paired_interval(rng.normal(0, 1, 500), rng.normal(0, 1, 500))
    assert lo < 0 < hi


def test_seed_resampled_interval_carries_training_run_spread():
    # seed 1 puts a above b by 0.1 on every patient, seed 2 below by 0.05: the seed-averaged model
    # is +0.025 on every patient, so the pooled interval is that point, but a redraw of the training
    # seeds gives +0.1 (both draws seed 1), -0.05 (both seed 2) or +0.025: it must reach both signs.
    a = np.array([[0.6] * 400, [0.45] * 400])
    b = np.full((2, 400), 0.5)
    d, lo, hi = paired_interval(a, b)
    assert (d, lo, hi) == pytest.approx((0.025, 0.025, 0.025))
    d, lo, hi = paired_interval(a, b, resample_seeds=True)
    assert d == pytest.approx(0.025) and lo == pytest.approx(-0.05) and hi == pytest.approx(0.1)
    # a model with one seed keeps its row; with one seed on both sides the two intervals are equal
    assert paired_interval(a[:1], b[:1], resample_seeds=True) == pytest.approx(paired_interval(a[:1], b[:1]))
    _, lo, hi = paired_interval(a, np.full(400, 0.5), resample_seeds=True)
    assert (lo, hi) == pytest.approx((-0.05, 0.1))


def test_seed_resampled_interval_matches_a_two_level_bootstrap_written_out():
    # unequal seed counts draw each model's seeds on their own; checked against the bootstrap spelled
    # out round by round (different random streams: the quantiles agree to Monte Carlo error)
    rng = np.random.default_rng(7)
    a = rng.normal(0.6, 0.2, (3, 300)) + rng.normal(0, 0.03, (3, 1))
    b = rng.normal(0.55, 0.2, (2, 300)) + rng.normal(0, 0.03, (2, 1))
    ref = []
    for _ in range(4000):
        ia, ib, j = rng.integers(0, 3, 3), rng.integers(0, 2, 2), rng.integers(0, 300, 300)
        ref.append(a[ia].mean(0)[j].mean() - b[ib].mean(0)[j].mean())
    lo, hi = np.quantile(ref, [0.025, 0.975])
    d, got_lo, got_hi = paired_interval(a, b, resample_seeds=True, rounds=4000)
    assert d == pytest.approx(a.mean() - b.mean()) and (got_lo, got_hi) == pytest.approx((lo, hi), abs=0.006)
    # rows that are different seeds are not drawn as pairs, even when the counts match
    a2, b2 = np.array([[0.6] * 400, [0.45] * 400]), np.array([[0.55] * 400, [0.40] * 400])
    assert paired_interval(a2, b2, resample_seeds=True)[1:] == pytest.approx((0.05, 0.05))
    _, lo, hi = paired_interval(a2, b2, resample_seeds=True, paired_seeds=False)
    assert (lo, hi) == pytest.approx((-0.1, 0.2))


def test_compare_pairs_seeds_by_id_not_by_row():
    from leader_edge.evaluation import report

    rows = {"student": np.array([[0.6] * 400, [0.45] * 400]), "student-nodistill": np.array([[0.55] * 400, [0.40] * 400])}
    per_unit = {name: {g: {k: v for k in report.COMPARED} for g in report.GROUPS} for name, v in rows.items()}
    pick = lambda comps: next(c for c in comps if (c["a"], c["group"], c["metric"]) == ("student", "overall", "prauc"))  # noqa: E731
    same = pick(report.compare(per_unit, seeds={"student": [42, 43], "student-nodistill": [42, 43]}))
    assert same["verdict"] == "student better"
    # seed 43 of one and 44 of the other (a seed missing on each side) must not be paired
    other = pick(report.compare(per_unit, seeds={"student": [42, 43], "student-nodistill": [42, 44]}))
    assert other["seed_low"] < 0 < other["seed_high"] and other["verdict"] == "within noise"


def test_verdict_and_goal_need_every_interval(data, tmp_path, monkeypatch):
    # the same disagreeing seeds through the report: pooled alone would call it "student better"
    from leader_edge.evaluation import report

    per_unit = {name: {g: {k: vals for k in report.COMPARED} for g in report.GROUPS}
                for name, vals in (("student", np.array([[0.6] * 400, [0.45] * 400])),
                                   ("student-nodistill", np.full((2, 400), 0.5)), ("frequency", np.full((1, 400), 0.4)))}
    comps = report.compare(per_unit)
    c = next(c for c in comps if (c["a"], c["b"], c["group"], c["metric"]) == ("student", "student-nodistill", "overall", "prauc"))
    assert c["low"] > 0 and c["seed_low"] < 0 and c["verdict"] == "within noise"
    f = next(c for c in comps if (c["a"], c["b"], c["group"], c["metric"]) == ("student", "frequency", "overall", "prauc"))
    assert f["seed_low"] == pytest.approx(0.05) and f["verdict"] == "student better"
    checks = {g["check"]: g for g in goals(comps)}
    assert checks["student - student-nodistill, prauc, overall"]["passed"] is False
    assert checks["student - frequency, prauc, overall"]["passed"] is True


def test_goals_need_the_interval_above_zero():
    comps = [{"a": "student", "b": b, "group": g, "metric": k, "low": 0.001 if b == "frequency" else -0.001}
             for b in ("frequency", "student-nodistill") for g in ("overall", "single_visit") for k in ("prauc", "jaccard")]
    assert [c["passed"] for c in goals(comps)] == [True] * 4 + [False] * 4
    assert all(c["passed"] is None for c in goals([]))


def test_write_report_leaves_out_seeds_of_an_earlier_run(data, tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"data": str(data), "seed": 42, "seeds": [42]}))
    fabricate(tmp_path, data, "student", noise=0.8, seed=1)
    fabricate(tmp_path, data, "student.seed-43", noise=0.8, seed=2, train_seed=43)  # left by a --seeds 2 run
    result = write_report(tmp_path)
    assert result["models"]["student"]["seeds"] == [42]


def test_summary_table_prints_every_group_metric_comparison_and_threshold(report_run):
    # what `make demo` ends with, rendered from metrics.json as the demo reads it
    run, result = report_run
    text = summary_table(json.loads((run / "metrics.json").read_text()))
    lines = text.splitlines()
    assert "protocol leader" in lines[0] and "training seeds 42, 43" in lines[0]
    for g in GROUPS:
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{g.replace('_', '-')} ("))
        assert lines[at + 1].split() == ["model", "seeds", "Jaccard", "PRAUC", "F1", "DDI", "rate", "#Med"]
        rows = [line.split()[0] for line in lines[at + 3:at + 3 + len(MODELS)]]
        assert rows == list(MODELS)
    student = next(line for line in lines if line.startswith("student ") and "±" in line).split()
    assert len(student) == 2 + 3 * 5  # model, seeds, then mean ± std for each of the five metrics
    # every pair, group and metric once, with its verdict in words; both intervals where a model has two seeds
    pairs = [line for line in lines if line.startswith("  ") and " - " in line and line.split()[3] in ("jaccard", "prauc", "f1")]
    assert len(pairs) == len(COMPARISONS) * len(GROUPS) * 3
    assert sum("student-nodistill - teacher" in line for line in pairs) == len(GROUPS) * 3
    assert all(line.endswith(("better", "within noise")) for line in pairs)
    assert all("] / [" in line for line in pairs if line.split()[0] == "student")
    assert any(line.endswith("student better") for line in pairs)  # noise 0.8 vs 0.98
    assert sum(line.strip().endswith(("yes", "NO", "n/a")) for line in lines) == 8  # the goal checks
    thresholds = lines[next(i for i, line in enumerate(lines) if line.startswith("thresholds")):]
    for name in MODELS:
        labels = [line[23:43].strip() for line in thresholds if line.startswith(f"{name:<22} ")]
        assert labels == ["tuned on validation", "0.5", "0.3"], name


def test_report_plots_one_colour_per_model_in_both_figures(tmp_path, monkeypatch):
    from matplotlib.colors import to_hex

    from leader_edge.evaluation import report_plots

    figures = []
    monkeypatch.setattr(report_plots, "save_figure", lambda fig, path: figures.append(fig))
    history = json.dumps([{"epoch": 1, "train_loss": 0.3, "val_prauc": 0.5}, {"epoch": 2, "train_loss": 0.2, "val_prauc": 0.6}])
    for d in ("student", "student.seed-43", "student-nodistill"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "history.json").write_text(history)
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "metrics.json").write_text(json.dumps({"history": [{"epoch": 1, "loss": 2.0, "val_prauc": 0.4}]}))
    assert report_plots.plot_training_curves(tmp_path, tmp_path / "curves.png")
    stat = {"mean": 0.5, "std": 0.01}
    models = {name: {"seeds": [42], "groups": {g: {"jaccard": stat, "prauc": stat} for g in GROUPS}} for name in MODELS}
    report_plots.plot_metrics_by_group(models, tmp_path / "bars.png", GROUPS)
    curves, bars = figures
    line_colour = {}
    for line in curves.axes[0].lines:  # the first line of each model carries its name; every seed's line its colour
        line_colour.setdefault(line.get_label(), set()).add(to_hex(line.get_color()))
    by_colour = {to_hex(line.get_color()) for line in curves.axes[0].lines + curves.axes[1].lines}
    bar_colour = {}
    for ax in bars.axes:
        for container in ax.containers:
            if hasattr(container, "patches"):
                name = container.get_label().split(" (")[0]
                bar_colour.setdefault(name, set()).update(to_hex(p.get_facecolor()) for p in container.patches)
    assert set(bar_colour) == set(MODELS)
    for name in MODELS:
        assert bar_colour[name] == {report_plots.MODEL_COLORS[name]}, name
    for name in ("student-nodistill", "student", "teacher"):
        assert line_colour[name] == bar_colour[name], name
    assert by_colour == {report_plots.MODEL_COLORS[n] for n in ("student-nodistill", "student", "teacher")}
    assert len(set(report_plots.MODEL_COLORS.values())) == len(MODELS)  # one colour per model, none shared


def test_comparison_from_before_the_seed_interval_still_renders():
    from leader_edge.evaluation import report

    old = {"a": "student", "b": "frequency", "group": "overall", "metric": "prauc", "diff": 0.01, "low": 0.002,
           "high": 0.02, "verdict": "student better", "seeds": [3, 1]}  # a metrics.json written before ca96728
    assert report._difference(old) == "+0.0100 [+0.0020, +0.0200]"


def test_write_report_refuses_edited_predictions_and_leaves_out_unfinished_stages(data, tmp_path):
    """An edited predictions file was reported as the model's (Jaccard 0, exit 0); a stage without
    metrics.json (not finished) was reported too."""
    from leader_edge.errors import StateError
    from leader_edge.files import sha256

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"data": str(data), "seed": 42, "seeds": [42]}))
    fabricate(run, data, "student", noise=0.8, seed=1)
    fabricate(run, data, "teacher", noise=0.6)
    metrics_file = run / "student" / "metrics.json"
    m = json.loads(metrics_file.read_text())
    metrics_file.write_text(json.dumps({**m, "files": {"predictions-test.csv": sha256(run / "student" / "predictions-test.csv")}}))
    (run / "teacher" / "metrics.json").unlink()
    result = write_report(run)
    assert "teacher" not in result["models"] and "student" in result["models"]
    preds = run / "student" / "predictions-test.csv"
    lines = preds.read_text().splitlines()
    lines[1] = ",".join(lines[1].split(",")[:2] + ["A11A"] + lines[1].split(",")[3:])
    preds.write_text("\n".join(lines) + "\n")
    with pytest.raises(StateError, match=r"predictions-test.csv is missing or does not match the sha256 .*--stage student"):
        write_report(run)
