"""The GPU acceptance run: one command, one results file, <= 8 minutes on one H100/H200.

    python benchmarks/gpu_acceptance.py --out gpu-acceptance            # on a CUDA machine
    python benchmarks/gpu_acceptance.py --out /tmp/acc --smoke          # CPU, tiny backbone and data (in make test)

Steps, each a subprocess of the installed CLI or a script, timed, its tail kept:
  1. kernel tests on the device (`pytest tests/kernels tests/train/test_student_triton.py` with
     TRITON_INTERPRET=0: every CUDA case, the student on the kernels included; smoke: the interpreter);
  2. the kernel benchmark (`benchmarks/bench_kernels.py`: the student's forward and forward+backward
     at B in {256, 4096, 65536} vs torch eager and torch.compile, table in OUT/kernels.md; smoke:
     `--smoke`, tiny sizes with the Triton interpreter);
  3. synth (default 2,000 patients; smoke: 60);
  4. the teacher: all 30 SmolLM2 layers with `configs/teacher-gpu.toml` (smoke: `--teacher tiny`, 1 epoch);
  5. the students (distilled and labels-only, one seed; smoke: 1 epoch), the report;
  6. export (int8), predict on the test patients' visits, then `evaluate --truth` against them.
Writes OUT/acceptance.json: per step the command, exit code, seconds and output tail, the device
name, and the report's metrics. Exits non-zero when a step fails (later steps are still listed,
as skipped). Each step may use what is left of --timeout (8 minutes): the whole run is bounded by it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _device(smoke: bool) -> str:
    if smoke:  # the smoke run hides CUDA from every step (CUDA_VISIBLE_DEVICES=""), so it is a CPU run anywhere
        return "cpu"
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as e:  # torch missing or broken: say so in the results
        return f"unknown ({e})"


def steps(out: Path, smoke: bool) -> list[tuple[str, list[str], dict]]:
    py = sys.executable
    cli = [py, "-m", "leader_edge"]
    data, run, bundle = out / "data", out / "run", out / "bundle"
    kernel_env = {"TRITON_INTERPRET": "1" if smoke else "0"}
    teacher = ["--teacher", "tiny", "--epochs", "1", "--student-epochs", "1"] if smoke else \
        ["--config", str(ROOT / "configs" / "teacher-gpu.toml")]
    kernel_tests = [py, "-m", "pytest", "-q", "-x", "-k", "cuda", str(ROOT / "tests" / "kernels"),
                    str(ROOT / "tests" / "train" / "test_student_triton.py")]
    if smoke:  # the interpreter runs the kernels on CPU; one small file keeps make test fast
        kernel_tests = [py, "-m", "pytest", "-q", "-x", str(ROOT / "tests" / "kernels" / "test_reference.py")]
    return [
        ("kernel tests", kernel_tests, kernel_env),
        ("kernel benchmark", [py, str(ROOT / "benchmarks" / "bench_kernels.py"), "--output", str(out / "kernels.md"),
                              *(["--smoke"] if smoke else [])], {}),
        ("synth", [*cli, "synth", "--out", str(data), "--patients", "60" if smoke else "2000", "--seed", "42"], {}),
        ("teacher + students", [*cli, "train", "--data", str(data), "--out", str(run), "--seed", "42", *teacher], {}),
        ("report", [*cli, "evaluate", "--run", str(run)], {}),
        # The smoke cohort's validation split holds 6 patients: one changed recommendation moves Jaccard
        # by more than the export gate's 0.005, so the smoke run writes the bundle with --force (a loud,
        # recorded override; the gate itself is tested in tests/export). The GPU run keeps the gate.
        ("export", [*cli, "export", "--run", str(run), "--out", str(bundle), "--int8", *(["--force"] if smoke else [])], {}),
        ("test visits", [py, "-c", "import sys; from pathlib import Path; from leader_edge.demo import write_split_visits; "
                         "write_split_visits(Path(sys.argv[1]), Path(sys.argv[2]), split='test', seed=42)",
                         str(data), str(out / "test-visits.csv")], {}),
        ("predict", [*cli, "predict", "--bundle", str(bundle), "--input", str(out / "test-visits.csv"), "--output",
                     str(out / "recommendations.csv")], {}),
        ("evaluate bundle", [*cli, "evaluate", "--truth", str(out / "test-visits.csv"), "--predictions",
                             str(out / "recommendations.csv"), "--label-space", str(bundle), "--output", str(out / "bundle-metrics.json")], {}),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="working directory; OUT/acceptance.json is the results file")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny backbone, tiny data: checks the script itself")
    p.add_argument("--timeout", type=float, default=480.0, help="seconds for the whole run (default 8 minutes)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {"device": _device(a.smoke), "smoke": a.smoke, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": []}
    failed = False
    for name, cmd, env in steps(a.out, a.smoke):
        left = a.timeout - (time.perf_counter() - started)
        if failed or left <= 0:
            results["steps"].append({"step": name, "command": cmd, "status": "skipped"})
            continue
        t = time.perf_counter()
        try:
            hide = {"CUDA_VISIBLE_DEVICES": ""} if a.smoke else {}
            proc = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", **hide, **env}, capture_output=True,
                                  text=True, timeout=left, cwd=ROOT)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired:
            rc, tail = 124, f"over the {a.timeout:.0f} s budget"
        seconds = round(time.perf_counter() - t, 1)
        results["steps"].append({"step": name, "command": cmd, "status": "ok" if rc == 0 else "failed", "exit": rc,
                                 "seconds": seconds, "tail": tail})
        print(f"{name:<18} {'ok' if rc == 0 else f'FAILED ({rc})':<12} {seconds:7.1f} s", file=sys.stderr, flush=True)
        failed = rc != 0
    metrics = a.out / "run" / "metrics.json"
    reported = any(st["step"] == "report" and st["status"] == "ok" for st in results["steps"])
    if reported and metrics.is_file():  # this run's report only, never a stale file in a reused OUT
        report = json.loads(metrics.read_text())
        results["report"] = {name: {g: {k: m["groups"][g][k]["mean"] for k in ("jaccard", "prauc", "f1")}
                                    for g in ("overall", "single_visit")} for name, m in report["models"].items()}
    results["seconds"] = round(time.perf_counter() - started, 1)
    tmp = a.out / ".acceptance.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(a.out / "acceptance.json")
    print(f"wrote {a.out / 'acceptance.json'} ({results['seconds']} s, device {results['device']})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
