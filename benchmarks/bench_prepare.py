"""Benchmark `leader-edge prepare mimic3` at full MIMIC-III scale (synthetic, 46k patients, ~4M prescriptions).

    .venv/bin/python benchmarks/bench_prepare.py [--patients 46000] [--repeats 3] [--work /tmp/bench-prepare]

Each measured command runs in its own child process, started by a small wrapper that reports the
child's peak RSS (getrusage(RUSAGE_CHILDREN).ru_maxrss). Baseline, measured in the same run: the
medication step alone as GAMENet/SafeDrug write it - `pd.read_csv(PRESCRIPTIONS.csv)` with default
dtypes (every column; NDC becomes float and loses its leading zeros, hence their `dtype={'NDC':
'category'}`), then `.map` NDC -> RXCUI -> ATC4, `merge`, `drop_duplicates`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "leader_edge"]

# Runs `argv` as a child and prints its wall time and peak RSS as JSON.
WRAPPER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(json.dumps({"rc": rc, "s": time.perf_counter() - t,
                  "rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""

BASELINE = """
import ast, sys, pandas as pd
root = sys.argv[1]
med = pd.read_csv(f"{root}/PRESCRIPTIONS.csv", low_memory=False)
med = med[["SUBJECT_ID", "HADM_ID", "NDC", "DRUG"]]
med = med[med["NDC"] != 0].dropna()
ndc2rx = ast.literal_eval(open(f"{root}/ndc2rxnorm_mapping.txt").read())
med["RXCUI"] = med["NDC"].map(lambda x: ndc2rx.get(f"{int(x):011d}"))
med = med.dropna()
rx2atc = pd.read_csv(f"{root}/RXCUI2atc4.csv").drop(columns=["YEAR", "MONTH", "NDC"]).drop_duplicates(subset=["RXCUI"])
med["RXCUI"] = med["RXCUI"].astype("int64")
med = med.merge(rx2atc, on=["RXCUI"])
med["ATC3"] = med["ATC4"].str[:4]
med = med[["SUBJECT_ID", "HADM_ID", "ATC3"]].drop_duplicates()
print(len(med))
"""


def measure(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, check=True, cwd=ROOT)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise SystemExit(f"{' '.join(argv)} failed with exit status {res['rc']}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=46000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-prepare"))
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()

    raw = args.work / f"mimic3-{args.patients}"
    if not (raw / "PRESCRIPTIONS.csv").exists():
        t = time.perf_counter()
        subprocess.run([*CLI, "synth", "--format", "mimic3", "--patients", str(args.patients), "--out", str(raw)], check=True)
        print(f"synth --format mimic3: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    with open(raw / "PRESCRIPTIONS.csv", "rb") as f:
        n_rx = sum(buf.count(b"\n") for buf in iter(lambda: f.read(1 << 24), b"")) - 1
    prepare = [*CLI, "prepare", "mimic3", "--root", str(raw), "--out", str(args.work / "dataset"),
               "--ndc-rxcui", str(raw / "ndc2rxnorm_mapping.txt"), "--rxcui-atc", str(raw / "RXCUI2atc4.csv"),
               "--ddi", str(raw / "drug-DDI.csv"), "--cid-atc", str(raw / "drug-atc.csv")]
    ours = [measure(prepare) for _ in range(args.repeats)]
    rows = [("prepare mimic3 (all steps, pyarrow)", ours)]
    if not args.no_baseline:
        rows.append(("baseline: medication step only, pandas default dtypes", [measure([sys.executable, "-c", BASELINE, str(raw)])]))

    load = os.getloadavg()[0]
    print(f"\n{args.patients:,} patients, {n_rx:,} PRESCRIPTIONS rows; load average {load:.1f} on {os.cpu_count()} cores\n")
    print("| command | runs | median s | peak RSS MB | time ratio to ours |")
    print("|---|---|---|---|---|")
    base = statistics.median(r["s"] for r in ours)
    for name, res in rows:
        s = statistics.median(r["s"] for r in res)
        rss = max(r["rss_mb"] for r in res)
        print(f"| {name} | {len(res)} | {s:.1f} | {rss:,.0f} | {s / base:.2f} |")


if __name__ == "__main__":
    main()
