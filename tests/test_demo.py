"""`make demo` (leader_edge/demo.py) without its 11 minutes: the steps are recorded, not run."""

import json

from leader_edge import demo
from leader_edge.evaluation.metrics import METRICS
from leader_edge.evaluation.report import COMPARED, COMPARISONS, GROUPS, MODELS, THRESHOLD_METRICS, goals


def fake_result() -> dict:
    """The shape of RUN/metrics.json as `evaluate --run` writes it: four models, one seed."""
    stat = {"mean": 0.5, "std": None, "by_seed": [0.5]}
    models = {name: {"seeds": [42], "groups": {g: {"n": 3, **{k: stat for k in METRICS}} for g in GROUPS},
                     "thresholds": {t: {k: 0.5 for k in THRESHOLD_METRICS} for t in ("tuned", "0.5", "0.3")}}
              for name in MODELS}
    comparisons = [{"a": a, "b": b, "group": g, "metric": k, "diff": 0.0, "low": -0.1, "high": 0.1, "seed_low": -0.1,
                    "seed_high": 0.1, "verdict": "within noise", "seeds": [1, 1]}
                   for a, b in COMPARISONS for g in GROUPS for k in COMPARED]
    return {"protocol": {"name": "leader", "description": "protocol leader: test"}, "seeds": [42], "models": models,
            "comparisons": comparisons, "goal": goals(comparisons)}


def test_demo_ends_with_the_report_summary(tmp_path, monkeypatch, capsys):
    result, steps = fake_result(), []

    def fake_run(args, *, stdout=None):
        steps.append(" ".join(args[:2]))
        if args[:2] == ["evaluate", "--run"]:  # the step that writes RUN/metrics.json
            (tmp_path / "run").mkdir(parents=True, exist_ok=True)
            (tmp_path / "run" / "metrics.json").write_text(json.dumps(result))

    summary_table = demo.summary_table
    monkeypatch.setattr(demo, "_run", fake_run)
    monkeypatch.setattr(demo, "write_split_visits", lambda *a, **k: 0)
    monkeypatch.setattr(demo, "summary_table", lambda r: steps.append("summary") or summary_table(r))
    demo.main(["--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert steps[-2:] == ["evaluate --truth", "summary"]  # after every command, not at step 4 of 7
    assert out.rstrip("\n").endswith(summary_table(result))  # the report's own rendering, last on stdout
    last = err.rstrip("\n").splitlines()[-1]  # then where the files are
    assert last.startswith("demo finished")
    for name in ("report.md", "training-curves.png", "metrics-by-group.png", "metrics.json"):
        assert str(tmp_path / "run" / name) in last
