"""Student training speed: this working tree against an earlier git revision, in one sitting.

    .venv/bin/python benchmarks/bench_train.py --run demo-out/run --against da4649a [--epochs 3] [--repeats 3]

The machine is shared and noisy, so the two code versions run alternately (A B A B ...) on the
same finished teacher (RUN/teacher, linked, never written) and the same dataset, and the table
gives the median seconds per student epoch of each (the stage's own `train_seconds / epochs_run`:
its setup - the prior's out-of-fold fit, epoch 0's validation - is included and amortised over the
epochs; imports and test scoring are not) and their ratio. The revision is checked out
into a temporary git worktree; the package-dir mapping of pyproject.toml (leader_edge.train ->
train/, .kernels, .export) is recreated there with links, and PYTHONPATH points at it, so the
installed environment runs the old code without reinstalling.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = ("train", "kernels", "export")  # [tool.setuptools.package-dir] of pyproject.toml


def checkout(rev: str, where: Path) -> Path:
    """A worktree of `rev` at `where` whose `leader_edge` package resolves its mapped subpackages."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(where), rev], check=True,
                   capture_output=True)
    for name in MAPPED:
        (where / "leader_edge" / name).symlink_to(where / name, target_is_directory=True)
    return where


def student_run(tree: Path | None, run: Path, data: Path, epochs: int, work: Path, label: str) -> dict[str, float]:
    """Train the students of `run`'s teacher with the code in `tree` (None: this tree); seconds per epoch."""
    out = work / label
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "teacher").symlink_to((run / "teacher").resolve(), target_is_directory=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LEADER_EDGE_QUIET": "1"}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    cmd = [sys.executable, "-m", "leader_edge", "train", "--data", str(data), "--out", str(out), "--stage", "student",
           "--student-epochs", str(epochs), "--seed", "42"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree or ROOT)
    if proc.returncode:
        raise SystemExit(f"{label}: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    if tree is not None:  # the run must really have used the old code
        probe = subprocess.run([sys.executable, "-c", "import leader_edge, leader_edge.train.distill as d; print(d.__file__)"],
                               env=env, capture_output=True, text=True, cwd=tree)
        assert probe.stdout.strip().startswith(str(tree)), probe.stdout + probe.stderr
    result = {"wall_s": time.perf_counter() - t0}
    for name in ("student", "student-nodistill"):
        m = json.loads((out / name / "metrics.json").read_text())
        result[name] = m["train_seconds"] / max(1, m["epochs_run"])
        result[f"{name}_jaccard"] = m["test"]["jaccard"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a run directory with a finished teacher stage")
    ap.add_argument("--data", type=Path, help="its dataset [default: run.json's]")
    ap.add_argument("--against", required=True, help="git revision to compare with (e.g. the commit before a change)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    data = args.data or Path(json.loads((args.run / "run.json").read_text())["data"])
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.against], check=True, capture_output=True,
                         text=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        tree = checkout(rev, work / "tree")
        rows: dict[str, list[dict]] = {"this tree": [], rev: []}
        for r in range(args.repeats):
            for label, where in (("this tree", None), (rev, tree)):
                rows[label].append(student_run(where, args.run, data, args.epochs, work / "runs", f"{label.replace(' ', '-')}-{r}"))
                print(f"repeat {r + 1}/{args.repeats} {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[label][-1].items()),
                      file=sys.stderr, flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "tree")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    print(f"\nstudent training, {args.epochs} epochs x {args.repeats} repeats, alternating; load {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")
    print(f"| s/epoch (median) | this tree | {rev} | ratio (this / {rev}) |")
    print("|---|---|---|---|")
    for name in ("student", "student-nodistill"):
        a = statistics.median(x[name] for x in rows["this tree"])
        b = statistics.median(x[name] for x in rows[rev])
        print(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.2f} |")
    for name in ("student", "student-nodistill"):
        a = statistics.median(x[f"{name}_jaccard"] for x in rows["this tree"])
        b = statistics.median(x[f"{name}_jaccard"] for x in rows[rev])
        print(f"| {name} test Jaccard (same seed) | {a:.4f} | {b:.4f} | |")


if __name__ == "__main__":
    main()
