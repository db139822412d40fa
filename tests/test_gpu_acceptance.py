"""The GPU acceptance script runs end to end in its CPU smoke form, so it cannot rot before a GPU is lent."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_acceptance_smoke_writes_every_step(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_acceptance.py"), "--out", str(tmp_path), "--smoke"],
                          capture_output=True, text=True, timeout=480)
    results = json.loads((tmp_path / "acceptance.json").read_text())
    assert proc.returncode == 0, json.dumps([s for s in results["steps"] if s["status"] != "ok"], indent=1)[-3000:]
    assert [s["status"] for s in results["steps"]] == ["ok"] * len(results["steps"]) and len(results["steps"]) == 9
    assert results["device"] == "cpu" and results["smoke"]
    assert set(results["report"]) >= {"frequency", "student", "student-nodistill", "teacher"}
    assert (tmp_path / "recommendations.csv").is_file()
