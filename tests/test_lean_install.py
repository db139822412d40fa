"""The bedside install: the base package alone (no torch, no training stack) runs `predict` on a bundle."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_base_package_alone_predicts_from_a_bundle(tmp_path):
    from test_runtime import HEADER, write_fake_bundle

    bundle = write_fake_bundle(tmp_path / "bundle")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True, timeout=480)
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout.lower()
    for heavy in ("torch", "transformers", "peft", "pyarrow", "pandas", "matplotlib", "scipy"):
        assert f"\n{heavy}==" not in "\n" + listed, f"{heavy} came with the base package"
    visits = tmp_path / "visits.csv"
    visits.write_text(HEADER + "p1,v1,2130-01-01,D1;D2,P1,,Medicare\np1,v2,2130-02-01,D2,P1,,Medicare\n"
                               "p2,v3,2130-01-05,D1,,,Private\n")
    out = tmp_path / "recs.csv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = subprocess.run([str(venv / "bin" / "leader-edge"), "predict", "--bundle", str(bundle), "--input", str(visits),
                          "--output", str(out)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert out.read_text().splitlines()[0].startswith("patient_id,visit_id,medications,scores")
    assert len(out.read_text().splitlines()) == 3  # one row per patient (the last visit)
