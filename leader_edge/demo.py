"""`make demo`: the whole pipeline on the embedded default, one command after another.

    python -m leader_edge.demo --out demo-out [--patients 2000] [--teacher smollm2]

Each step is the same `leader-edge` command a user would type, run as a subprocess so the demo
exercises the installed CLI exactly; the commands are echoed so they can be copied. It ends by
printing the run's report (RUN/metrics.json through the report's own `summary_table`) and where
report.md, the plots and metrics.json are.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from leader_edge.evaluation.report import report_files, summary_table


def _run(args: list[str], *, stdout: Path | None = None) -> None:
    cmd = [sys.executable, "-m", "leader_edge", *args]
    shown = "leader-edge " + shlex.join(args) + (f" > {stdout}" if stdout else "")
    print(f"\n$ {shown}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if stdout is None:
        rc = subprocess.run(cmd, env=env).returncode
    else:
        with open(stdout, "w", encoding="utf-8") as f:
            rc = subprocess.run(cmd, env=env, stdout=f).returncode
    if rc != 0:
        raise SystemExit(f"demo step failed (exit {rc}): {shown}")
    print(f"  ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)


def write_split_visits(data: Path, dst: Path, *, split: str, seed: int) -> int:
    """Write the visits of one split's patients (same split as training) to `dst`: read and written
    by the dataset's own reader and writer, so the file keeps the visits contract."""
    from leader_edge.data.dataset import load_dataset, write_visits
    from leader_edge.data.splits import split_patients

    ds = load_dataset(data)
    keep = set(split_patients(list(ds.patients()), seed=seed)[split])
    return write_visits((v for v in ds.visits if v.patient_id in keep), dst, ds.profile_fields)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="working directory (default demo-out)")
    p.add_argument("--patients", type=int, default=2000, help="synthetic patients (default 2000)")
    p.add_argument("--teacher", default="smollm2", help="teacher backbone (default smollm2, the embedded SmolLM2-135M)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--seeds", type=int, default=3, help="student training seeds (default 3: a claim needs several)")
    a = p.parse_args(argv)
    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    data, run, bundle = out / "data", out / "run", out / "bundle"
    started = time.perf_counter()

    _run(["synth", "--out", str(data), "--patients", str(a.patients), "--seed", str(a.seed)])
    _run(["evaluate", "--baseline", "frequency", "--data", str(data), "--seed", str(a.seed)])
    _run(["train", "--data", str(data), "--out", str(run), "--teacher", a.teacher, "--seed", str(a.seed), "--seeds", str(a.seeds)])
    _run(["evaluate", "--run", str(run), "--data", str(data)])
    _run(["export", "--run", str(run), "--out", str(bundle), "--int8"])
    test_visits, recs = out / "test-visits.csv", out / "recommendations.csv"
    n = write_split_visits(data, test_visits, split="test", seed=a.seed)
    print(f"\nwrote {n} visits of the test patients to {test_visits}", file=sys.stderr)
    _run(["predict", "--bundle", str(bundle), "--input", str(test_visits), "--out", str(recs)])
    _run(["evaluate", "--truth", str(test_visits), "--predictions", str(recs), "--ddi", str(data / "ddi.csv"),
          "--label-space", str(bundle)])
    print_report_summary(run)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s. {report_files(run)}", file=sys.stderr, flush=True)


def print_report_summary(run: Path) -> None:
    """The run's report, as `evaluate --run` wrote it to RUN/metrics.json, rendered for the terminal
    (stdout) by the report's own `summary_table`: every group x model x metric, the paired comparisons
    and their verdicts, the tuned / 0.5 / 0.3 rows, the protocol and the seeds."""
    result = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    print(f"\n== the report of {run} (also in {run / 'report.md'}) ==\n{summary_table(result)}", flush=True)


if __name__ == "__main__":
    main()
