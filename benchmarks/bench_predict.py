"""Bedside runtime benchmark: cold start, end-to-end `predict`, per-patient model latency.

    .venv/bin/python benchmarks/bench_predict.py [--patients 100000] [--workdir /tmp/leader-edge-bench] [--run RUN]
        [--set-encoder transformer|mean] [--baseline-src DIR --baseline-workdir DIR [--repeats N]] [--end-to-end-only]

Measured in one run (baseline: the torch eager fp32 student, same inputs, same process):
  1. cold start: wall time of `leader-edge predict` on a one-patient file (median of 5 runs);
  2. end to end: `leader-edge predict` CSV -> CSV on `--patients` synth patients, fp32 and int8 bundles;
  3. model latency at batch 1 (p50, p99; one thread each) and throughput at batch 1024 (all cores):
     torch eager fp32 vs ORT fp32 vs ORT int8, on pre-encoded inputs.
Without --run, the student has random weights on the synth vocabulary: its model cost is the
trained model's (the shapes come from the architecture and the codes of each visit), but its
probabilities hover around 0.5, so it recommends about half of all medications to everyone, with
hundreds of interaction warnings: ~4.7 KB of output per patient against ~1.8 KB for the trained
demo student, which makes it the formatting-heavy worst case, not the bedside case. With --run, the
input is generated from the run's own vocabulary (`visits_for_run`): the synth patients, visits and
codes per visit, each kind's codes mapped by frequency rank onto the run encoder's codes, so every
code is known to the bundle. (The synth file scored as it is had 58% unknown codes against the demo
run, which `predict` now refuses; --allow-unknown would have timed a model reading almost nothing.) `--set-encoder`
picks that student's per-kind set encoder (`StudentConfig.set_encoder`).
`--baseline-src` (an older leader_edge tree, e.g. `git archive <commit> leader_edge | tar -x -C DIR`)
adds end-to-end rows for that code with the bundles it exported into `--baseline-workdir` (same
names), run alternately with this code's, and the ratio of the medians, of wall time and of CPU
seconds (user + system of the `predict` process: on a shared machine other processes stretch the
first, not the second). Without it, `--repeats` end-to-end runs alternate fp32 and int8 (fp32,
int8, fp32, ...) and the table gives each run, the medians and int8 / fp32 of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "leader_edge"]


def shipped_set_encoder() -> str:
    """`StudentConfig.set_encoder`'s default: the set encoder of the student `train` ships."""
    from dataclasses import fields

    from leader_edge.train.student import StudentConfig

    return next(f.default for f in fields(StudentConfig) if f.name == "set_encoder")


def visits_for_run(synth_visits: Path, run: Path, out: Path) -> Path:
    """`synth_visits` with each kind's codes mapped onto the vocabulary of RUN/student: the synth
    code of frequency rank i becomes the run's code i (modulo its vocabulary); a visit keeps its
    number of distinct codes unless two of them map to one. Profile columns are kept as they are."""
    import csv
    from collections import Counter

    from leader_edge.bedside.encoding import CODE_COLUMNS, KINDS
    from leader_edge.train.stage_files import load_student

    if out.exists():
        return out
    _, encoder, _ = load_student(run / "student", backend="torch")
    with open(synth_visits, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    mapping = {}
    for kind, column in zip(KINDS, CODE_COLUMNS):
        counts = Counter(c for r in rows for c in r[column].split(";") if c)
        vocab = encoder.codes[kind]
        mapping[column] = {c: vocab[i % len(vocab)] for i, (c, _) in enumerate(counts.most_common())} if vocab else {}
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            for column, m in mapping.items():
                r[column] = ";".join(dict.fromkeys(m[c] for c in r[column].split(";") if c))
            w.writerow(r)
    tmp.replace(out)
    return out


def setup(workdir: Path, patients: int, run: Path | None, set_encoder: str) -> tuple[Path, Path, Path]:
    """(visits.csv, fp32 bundle, int8 bundle), built once and reused from `workdir`; with `run`, the
    visits are in the run's vocabulary (`visits_for_run`)."""
    import torch

    from leader_edge.data.dataset import load_dataset, write_dataset
    from leader_edge.bedside.encoding import KINDS, Encoder
    from leader_edge.export.bundle import export_bundle
    from leader_edge.data.synth import synth_dataset

    data = workdir / f"synth-{patients}"
    if not (data / "visits.csv").exists():
        write_dataset(synth_dataset(patients=patients, seed=7), data, source="synth")
    visits = data / "visits.csv"
    if run is None:
        run = workdir / f"run-{set_encoder}"
        if not (run / "student" / "config.json").exists():
            from leader_edge.train.stage_files import save_student
            from leader_edge.train.student import Student, StudentConfig

            ds = load_dataset(data)
            enc = Encoder.from_visits({k: ds.vocab(k) for k in KINDS}, ds.visits)
            torch.manual_seed(0)
            model = Student(StudentConfig(enc.n_codes, enc.n_meds, enc.n_profile_ids, enc.med_offset, dropout=0.0,
                                          set_encoder=set_encoder))
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0, 0.15)
            (run / "student").mkdir(parents=True, exist_ok=True)
            save_student(run / "student", model.eval(), enc, 0.5, {"seed": 42, "data": str(data)})
    else:
        run = run.resolve()
        visits = visits_for_run(visits, run, workdir / f"visits-{patients}-{run.parent.name}-{run.name}.csv")
    bundles = []
    for name, int8 in (("bundle-fp32", False), ("bundle-int8", True)):
        out = workdir / f"{name}-{run.name}"
        if not (out / "manifest.json").exists():
            export_bundle(run, out, int8=int8)
        bundles.append(out)
    return visits, bundles[0], bundles[1]


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def cold_start(visits: Path, bundle: Path, workdir: Path) -> dict:
    with open(visits, encoding="utf-8") as f:
        header, first = f.readline(), f.readline()
    one = workdir / "one-patient.csv"
    one.write_text(header + first, encoding="utf-8")
    cmd = [str(Path(sys.executable).with_name("leader-edge")), "predict", "--bundle", str(bundle), "--input", str(one),
           "--output", str(workdir / "one-out.csv")]
    times = [wall(cmd) for _ in range(6)][1:]  # the first run warms the page cache
    imp = subprocess.run([sys.executable, "-X", "importtime", "-c", "import leader_edge.cli.predict, leader_edge.bedside.runtime, onnxruntime"],
                         capture_output=True, text=True, check=True).stderr
    total_us = sum(int(line.split("|")[0].split(":")[1]) for line in imp.splitlines() if line.startswith("import time:") and "self" not in line)
    return {"cold_start_s": statistics.median(times), "import_s": total_us / 1e6}


def end_to_end(visits: Path, bundle: Path, workdir: Path, patients: int, src: Path | None = None) -> tuple[float, float]:
    """(patients/s of wall time, patients per CPU second) of `leader-edge predict` CSV -> CSV; `src`:
    run that leader_edge tree instead. CPU seconds (user + system of the child, all its threads) are
    the steadier measure on a shared machine: another process's load stretches wall time, not them."""
    env = None if src is None else {**os.environ, "PYTHONPATH": str(src)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([*CLI, "predict", "--bundle", str(bundle), "--input", str(visits), "--output", str(workdir / "out.csv")],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=workdir)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return patients / seconds, patients / cpu


def model_speed(visits: Path, fp32: Path, int8: Path, run: Path, n_single: int = 300, threads: int = 0) -> dict:
    """Batch-1 latency on one thread; batch-1024 throughput on `threads` threads per provider (0: all
    cores, each library's default). One thread each is the steadier comparison on a shared machine:
    torch's 2 OpenMP threads collapse when another process holds a core."""
    import torch

    from leader_edge.train.stage_files import load_student
    from leader_edge.bedside.visit_stream import read_patients

    model, encoder, _ = load_student(run / "student", backend="torch")
    with open(visits, "rb") as f:
        chunk = next(read_patients(f, str(visits), chunk_patients=8192))
    encoded = encoder.encode_table(chunk)
    ends = encoded.last_rows()
    singles = [encoded.batch(ends[i : i + 1]).inputs() for i in range(n_single)]  # file order: a mix of sizes
    ends = ends[encoded.size_order(ends)]  # as the runtime batches them
    big = [encoded.batch(ends[i : i + 1024]).inputs() for i in range(0, 8192, 1024)]

    def torch_run(inputs):
        with torch.inference_mode():
            return model.predict_proba(*(torch.from_numpy(v) for v in inputs.values()))

    out = {}
    default = torch.get_num_threads()
    for name, one, many in (
        ("torch eager fp32", torch_run, torch_run),
        ("ORT fp32", ort_runner(fp32 / "model.onnx"), ort_runner(fp32 / "model.onnx", threads=threads)),
        ("ORT int8", ort_runner(int8 / "model.onnx"), ort_runner(int8 / "model.onnx", threads=threads)),
    ):
        torch.set_num_threads(1)
        p50, p99 = batch1_ms(one, singles, repeats=3)
        torch.set_num_threads(threads or default)
        many(big[0])
        rates = []
        for _ in range(3):
            start = time.perf_counter()
            for b in big:
                many(b)
            rates.append(8192 / (time.perf_counter() - start))
        out[name] = {"p50_ms": p50, "p99_ms": p99, "batch1024_patients_per_s": statistics.median(rates)}
    out["int8_variant"] = json.loads((int8 / "manifest.json").read_text())["model"]["variant"]
    return out


def batch1_ms(run, singles: list[dict], repeats: int = 1) -> tuple[float, float]:
    """(p50, p99) milliseconds of `run(inputs)` at batch 1 over `singles` (after 5 warm-up calls)."""
    import numpy as np

    for b in singles[:5]:
        run(b)
    times = []
    for _ in range(repeats):
        for b in singles:
            t = time.perf_counter()
            run(b)
            times.append(time.perf_counter() - t)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def ort_runner(path: Path, threads: int = 1):
    """`inputs -> probabilities` for an ONNX file (one intra-op thread: batch-1 latency)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda inputs: session.run(None, inputs)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/leader-edge-bench"))
    parser.add_argument("--run", type=Path, help="a trained run directory (default: a random-weight student)")
    parser.add_argument("--set-encoder", choices=("transformer", "mean"), default=shipped_set_encoder(),
                        help="set encoder of the random-weight student (default: the shipped one, StudentConfig's)")
    parser.add_argument("--baseline-src", type=Path, help="an older leader_edge source tree to compare end to end")
    parser.add_argument("--baseline-workdir", type=Path, help="where that code exported its bundles (same names)")
    parser.add_argument("--repeats", type=int, default=3, help="end-to-end runs per side (fp32/int8, or baseline/this code)")
    parser.add_argument("--threads", type=int, default=0, help="threads per provider at batch 1024 (0: all cores)")
    parser.add_argument("--end-to-end-only", action="store_true", help="skip the model latency and cold-start rows")
    args = parser.parse_args()
    if (args.baseline_src is None) != (args.baseline_workdir is None):
        parser.error("--baseline-src and --baseline-workdir go together")
    args.workdir.mkdir(parents=True, exist_ok=True)
    visits, fp32, int8 = setup(args.workdir, args.patients, args.run, args.set_encoder)
    run = args.run or args.workdir / f"run-{args.set_encoder}"
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {args.patients:,} patients; "
          f"student {run} (set encoder {args.set_encoder if args.run is None else 'from the run'})", flush=True)
    if not args.end_to_end_only:
        speed = model_speed(visits, fp32, int8, run, threads=args.threads)
        base = speed["torch eager fp32"]
        print(f"\n| model | p50 ms (batch 1) | p99 ms (batch 1) | patients/s (batch 1024, {args.threads or 'all'} threads) | x torch eager |")
        print("|---|---|---|---|---|")
        for name in ("torch eager fp32", "ORT fp32", "ORT int8"):
            s = speed[name]
            print(f"| {name} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {s['batch1024_patients_per_s']:,.0f} | "
                  f"{s['batch1024_patients_per_s'] / base['batch1024_patients_per_s']:.2f} (batch 1: {base['p50_ms'] / s['p50_ms']:.2f}) |")
        print(f"int8 variant kept by export: {speed['int8_variant']}")
        cold = cold_start(visits, int8, args.workdir)
        print(f"\ncold start (one-patient file, whole CLI): {cold['cold_start_s']:.3f} s median of 5; imports {cold['import_s']:.3f} s")
    if args.baseline_src is None:
        variant = json.loads((int8 / "manifest.json").read_text())["model"]["variant"]
        print(f"\n| end to end CSV -> CSV | run | fp32 patients/s | {variant} patients/s | fp32 per CPU s | "
              f"{variant} per CPU s |\n|---|---|---|---|---|---|")
        runs = []
        for i in range(args.repeats):  # alternating, so a change of load hits both sides alike
            runs.append((*end_to_end(visits, fp32, args.workdir, args.patients), *end_to_end(visits, int8, args.workdir, args.patients)))
            print(f"| | {i + 1} | {runs[-1][0]:,.0f} | {runs[-1][2]:,.0f} | {runs[-1][1]:,.0f} | {runs[-1][3]:,.0f} |", flush=True)
        f32, f32_cpu, i8, i8_cpu = (statistics.median(r) for r in zip(*runs))
        print(f"| median of {args.repeats} | | {f32:,.0f} | {i8:,.0f} | {f32_cpu:,.0f} | {i8_cpu:,.0f} |")
        print(f"| int8 / fp32 (medians) | | | {i8 / f32:.2f} | | {i8_cpu / f32_cpu:.2f} |")
    else:
        print("\n| end to end CSV -> CSV | baseline patients/s | this code | x baseline | baseline per CPU s | "
              "this code | x baseline |\n|---|---|---|---|---|---|---|")
        for bundle in (fp32, int8):
            old_bundle = args.baseline_workdir / bundle.name
            runs = [(*end_to_end(visits, old_bundle, args.workdir, args.patients, args.baseline_src.resolve()),
                     *end_to_end(visits, bundle, args.workdir, args.patients)) for _ in range(args.repeats)]
            old, old_cpu, new, new_cpu = (statistics.median(r) for r in zip(*runs))
            print(f"| {bundle.name} (median of {args.repeats}, alternating) | {old:,.0f} | {new:,.0f} | {new / old:.2f} | "
                  f"{old_cpu:,.0f} | {new_cpu:,.0f} | {new_cpu / old_cpu:.2f} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
