"""RUN/student -> a validated bundle directory (model.onnx + manifest.json).

    export_bundle(run_dir, out, int8=True)

Steps: load the torch student (reference ops), export fp32 ONNX, optionally quantize to int8 two
ways (dynamic, static QDQ calibrated on training samples) and keep the better one (`choose_int8`),
then hold the chosen model to the torch student on the validation split (`gate`): max |dp|,
Jaccard and PRAUC deltas at the student's threshold. A Jaccard drop over `MAX_JACCARD_DROP`
refuses the bundle unless `force`. The directory is written atomically; an existing directory is
replaced only if it is a bundle, and the run directory itself is refused as a destination.
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

from leader_edge import metrics
from leader_edge.dataset import atomic_directory, dataset_splits, load_dataset
from leader_edge.encoding import Encoder
from leader_edge.export import onnx as onnx_export
from leader_edge.runtime import BUNDLE_FORMAT, MANIFEST, MODEL, sha256

log = logging.getLogger(__name__)

MAX_JACCARD_DROP = 0.01  # the gate; the target is <= 0.005
# Two int8 candidates within this Jaccard of each other are "equally accurate": the faster wins.
JACCARD_TIE = 0.002
PACKAGES = ("leader-edge", "torch", "onnx", "onnxruntime", "onnxscript", "numpy")


@dataclass
class Candidate:
    """A model file with its validation probabilities and measured speed."""

    name: str  # "fp32", "int8-dynamic" or "int8-static"
    path: Path
    y_prob: np.ndarray  # float32 [N_val, M]
    ms_per_patient: float  # median batch-1 latency
    jaccard: float
    prauc: float


def load_run(run_dir: Path):
    """(torch student on CPU with reference ops, encoder, RUN/student/config.json dict)."""
    from leader_edge.train.distill import load_student

    student_dir = Path(run_dir) / "student"
    model, encoder, _ = load_student(student_dir, backend="torch")
    config = json.loads((student_dir / "config.json").read_text(encoding="utf-8"))
    return model, encoder, config


def _data_dir(run_dir: Path, config: dict) -> Path:
    data = config.get("data")
    if data is None and (run_dir / "run.json").exists():
        data = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("data")
    if data is None or not Path(data).is_dir():
        raise RuntimeError(f"the dataset of {run_dir} ({data!r}) is not available; export needs it for the "
                           "validation gate - restore it at that path")
    return Path(data)


def ort_proba(path: Path, encoded: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Probabilities of an ONNX file over pre-encoded batches (concatenated rows)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, b)[0] for b in encoded])


def batch1_ms(run, singles: list[dict[str, np.ndarray]], repeats: int = 1) -> tuple[float, float]:
    """(p50, p99) milliseconds of `run(inputs)` at batch 1 over `singles` (after 5 warm-up calls)."""
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


def encode_batches(encoder: Encoder, histories: list, batch_size: int) -> list[dict[str, np.ndarray]]:
    return [encoder.encode(histories[i : i + batch_size]).inputs() for i in range(0, len(histories), batch_size)]


def choose_int8(candidates: list[Candidate]) -> Candidate:
    """The more accurate int8 model; within `JACCARD_TIE` Jaccard of each other, the faster one.

    Accuracy first because the gate is about Jaccard; at this size both variants are near the
    fp32 latency, so speed decides only between equally accurate models."""
    best = max(candidates, key=lambda c: c.jaccard)
    tied = [c for c in candidates if best.jaccard - c.jaccard <= JACCARD_TIE]
    return min(tied, key=lambda c: c.ms_per_patient)


def gate(reference: np.ndarray, y_prob: np.ndarray, y_true: np.ndarray, threshold: float) -> dict:
    """Validation deltas of a bundle model vs the torch student (both [N, M] probabilities)."""
    ref = metrics.score(y_true, reference, threshold)
    got = metrics.score(y_true, y_prob, threshold)
    return {
        "max_abs_dp": float(np.abs(reference.astype(np.float64) - y_prob).max()),
        "torch_jaccard": ref["jaccard"], "bundle_jaccard": got["jaccard"],
        "jaccard_delta": got["jaccard"] - ref["jaccard"],
        "torch_prauc": ref["prauc"], "bundle_prauc": got["prauc"], "prauc_delta": got["prauc"] - ref["prauc"],
        "n_visits": int(len(y_true)), "threshold": threshold, "max_jaccard_drop": MAX_JACCARD_DROP,
    }


def _packages() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def export_bundle(run_dir: str | Path, out: str | Path, *, int8: bool = False, calibration_samples: int = 512,
                  force: bool = False, batch_size: int = 256) -> dict:
    """Export RUN/student to a validated bundle directory; return its manifest.

    Args:
        run_dir: a run directory from `leader-edge train` (RUN/student and its dataset needed).
        out: the bundle directory to write (replaced only if it is a bundle).
        int8: quantize (dynamic and static QDQ tried, the better kept); else fp32.
        calibration_samples: training samples that calibrate static quantization.
        force: write the bundle even if its validation Jaccard drops by more than MAX_JACCARD_DROP.

    Raises:
        ValueError: `out` is the run directory (or inside RUN/student), or not a bundle directory.
        RuntimeError: the gate fails without `force`; the run or its dataset is missing.
    """
    import torch

    run_dir, out = Path(run_dir).resolve(), Path(out).resolve()
    if out == run_dir or out == run_dir / "student" or run_dir in out.parents and out.parent == run_dir / "student":
        raise ValueError(f"--out {out} is the run directory or inside its student; write the bundle to a new directory")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())):
        raise ValueError(f"--out {out} exists and is not a leader-edge bundle; choose a new path or remove it")
    model, encoder, config = load_run(run_dir)
    threshold = float(config["threshold"])
    ds = load_dataset(_data_dir(run_dir, config))
    seed = int(config.get("seed", 42))
    splits = dataset_splits(ds, seed=seed, train_per_visit=True)
    val = [s.visits for s in splits["val"]]
    if not val:
        raise RuntimeError(f"the validation split of {ds.meta.get('source', 'the dataset')} is empty; the gate needs visits")
    y_true = encoder.multi_hot(val) > 0
    encoded = encode_batches(encoder, val, batch_size)
    with torch.no_grad():
        reference = np.concatenate([model.predict_proba(*(torch.from_numpy(b[n]) for n in b)).numpy() for b in encoded])
    singles = [encoder.encode([v]).inputs() for v in val[:200]]

    with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent if out.parent.exists() else None) as tmp:
        work = Path(tmp)
        example = onnx_export.example_inputs(encoder.n_codes, encoder.n_profile_ids, len(encoder.profile_fields))
        fp32 = onnx_export.export_onnx(model, work / "fp32.onnx", example)
        candidates = [_candidate("fp32", fp32, encoded, singles, y_true, threshold)]
        log.info("fp32: max |dp| %.2e vs torch", np.abs(candidates[0].y_prob - reference).max())
        if int8:
            rng = np.random.default_rng(seed)
            train = [s.visits for s in splits["train"]]
            pick = rng.choice(len(train), size=min(calibration_samples, len(train)), replace=False)
            calibration = encode_batches(encoder, [train[i] for i in pick], 64)
            quantized = [
                ("int8-dynamic", lambda p: onnx_export.quantize_dynamic_int8(fp32, p)),
                ("int8-static", lambda p: onnx_export.quantize_static_int8(fp32, p, calibration)),
            ]
            tried = []
            for name, make in quantized:
                path = make(work / f"{name}.onnx")
                onnx_export.quantize_embeddings(path)
                tried.append(_candidate(name, path, encoded, singles, y_true, threshold))
            for c in tried:
                log.info("%s: Jaccard %.4f PRAUC %.4f, %.3f ms/patient at batch 1, %.0f KiB", c.name, c.jaccard,
                         c.prauc, c.ms_per_patient, c.path.stat().st_size / 1024)
            chosen = choose_int8(tried)
        else:
            tried, chosen = [], candidates[0]
        validation = gate(reference, chosen.y_prob, y_true, threshold)
        validation["candidates"] = {c.name: {"jaccard": c.jaccard, "prauc": c.prauc, "ms_per_patient": c.ms_per_patient,
                                             "bytes": c.path.stat().st_size} for c in candidates + tried}
        if -validation["jaccard_delta"] > MAX_JACCARD_DROP:
            text = (f"{chosen.name} drops validation Jaccard by {-validation['jaccard_delta']:.4f} "
                    f"(> {MAX_JACCARD_DROP}) against the torch student")
            if not force:
                raise RuntimeError(f"{text}; bundle refused. Export without --int8, raise --calibration-samples, "
                                   "or pass --force to write it anyway")
            log.warning("!!! --force: %s; writing the bundle anyway !!!", text)
            validation["forced"] = True
        manifest = {
            "format_version": BUNDLE_FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {"file": MODEL, "sha256": sha256(chosen.path), "bytes": chosen.path.stat().st_size,
                      "variant": chosen.name, "fp32_bytes": fp32.stat().st_size, "inputs": list(singles[0]),
                      "output": "probabilities float32 [B, n_meds]", "opset": onnx_export.OPSET},
            "threshold": threshold,
            "profile_fields": encoder.profile_fields,
            "encoder": encoder.to_json(),
            "ddi_pairs": [list(p) for p in ds.ddi],
            "validation": validation,
            "source": {"run": str(run_dir), "student": config.get("student"), "seed": seed},
            "packages": _packages(),
        }
        with atomic_directory(out, marker=MANIFEST, what="leader-edge bundle") as tmp_out:
            (tmp_out / MODEL).write_bytes(chosen.path.read_bytes())
            (tmp_out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _candidate(name: str, path: Path, encoded, singles, y_true: np.ndarray, threshold: float) -> Candidate:
    y_prob = ort_proba(path, encoded)
    score = metrics.score(y_true, y_prob, threshold)
    p50, _ = batch1_ms(ort_runner(path), singles)
    return Candidate(name, path, y_prob, p50, score["jaccard"], score["prauc"])
