"""The bedside runtime: a validated bundle + a visits CSV -> recommendations. No torch.

Imports only onnxruntime, numpy, the standard library and torch-free leader_edge modules
(`encoding`, `visit_stream`, `visit_table`, `formatting`, `dataset`'s parsing helpers, `errors`),
so `leader-edge predict` starts in ~0.3 s.

    bundle = Bundle.load("bundle/")                      # checks the model's sha256
    for chunk in read_patients(open("visits.csv", "rb"), "visits.csv"):   # VisitTable chunks
        result = bundle.predict(chunk)                   # one row per predicted visit
        text = csv_chunk(bundle, result, plain_codes=plain_codes(bundle.med_codes))

Streaming (`leader_edge.visit_stream`): patients arrive in chunks, so memory is set by the chunk
and batch sizes (~0.5 GB peak for the whole CLI on 100k synth patients, most of it onnxruntime's
arena) plus the file-wide duplicate checks, measured at ~60 bytes per row of peak growth (155 MB
after 1M rows against 97 MB after 20k; ~0.6 GB more at 10M rows).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leader_edge.encoding import Batch, Encoder, RawVisit
from leader_edge.errors import DataError
from leader_edge.formatting import OUTPUT_COLUMNS, csv_chunk, format_rows, plain_codes
from leader_edge.visit_stream import Patient, read_patients
from leader_edge.visit_table import VisitTable, encode_table

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
MODEL = "model.onnx"
VISIT_SLOTS = 2048  # padded visit slots per model call (see Bundle.predict_proba)


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()



# ---------------------------------------------------------------------------------------------
# The bundle and the model


@dataclass
class Scored:
    """Predicted visits of one chunk: N rows, M medications (bundle order)."""

    patient_ids: list[str]
    visit_ids: list[str]
    y_prob: np.ndarray  # float32 [N, M]
    unknown: np.ndarray  # int64 [N] codes the model has never seen, in the visits it read


class Bundle:
    """A bundle directory (model.onnx + manifest.json) opened for inference.

    Attributes:
        manifest: the parsed manifest.json.
        encoder: the training encoder (vocabularies, profile fields, caps).
        threshold: the validation-tuned decision threshold.
        med_codes: M medication codes, the column order of every probability matrix.
        ddi: int64 [P, 2] interacting medication pairs as column indices.
    """

    def __init__(self, path: Path, manifest: dict, session) -> None:
        self.path, self.manifest, self.session = path, manifest, session
        self.encoder = Encoder.from_json(manifest["encoder"])
        self.threshold = float(manifest["threshold"])
        self.med_codes: list[str] = list(self.encoder.codes["medication"])
        index = {c: j for j, c in enumerate(self.med_codes)}
        pairs = [(index[a], index[b]) for a, b in manifest.get("ddi_pairs", []) if a in index and b in index]
        self.ddi = np.array(pairs, dtype=np.int64).reshape(-1, 2)

    @classmethod
    def load(cls, path: str | Path, *, threads: int = 0) -> "Bundle":
        """Open a bundle, refusing a wrong format version or a model whose sha256 differs.

        Args:
            path: the bundle directory written by `leader-edge export`.
            threads: onnxruntime intra-op threads; 0 lets it use every physical core.

        Raises:
            RuntimeError: not a bundle, unreadable manifest, unknown format, checksum mismatch.
        """
        import onnxruntime as ort

        d = Path(path)
        manifest = read_manifest(d)
        model = d / manifest["model"]["file"]
        digest = sha256(model)
        if digest != manifest["model"]["sha256"]:
            raise RuntimeError(f"{model}: sha256 {digest[:16]}... does not match the manifest's "
                               f"{manifest['model']['sha256'][:16]}...; the model file was changed or damaged - "
                               "export the bundle again with `leader-edge export`")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # warnings about unused initializers are noise for the user
        # Idle intra-op threads sleep instead of spinning: they spun on the cores that read and
        # format the next chunks (predict_file, 100k patients, 2-core VM at load ~3.3: 8,546 and
        # 8,867 patients/s spinning vs 10,664 and 11,162 not).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        return cls(d, manifest, session)

    def predict_proba(self, patients: list[list[RawVisit]], *, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities for each patient's last visit.

        Patients are sorted by size before batching so that a batch pads to similar lengths, and a
        batch holds at most `batch_size` patients and `VISIT_SLOTS` padded visit slots (B x K), which
        bounds onnxruntime's memory arena: 1024 patients x 8 visits made it grow to ~800 MB.
        Rows come back in input order.

        Returns:
            (float32 [N, M] probabilities, int64 [N] unknown-code counts).
        """
        k = self.encoder.max_visits
        order = np.array(size_order(patients, k), dtype=np.int64)
        kept = np.array([min(len(p), k) for p in patients], dtype=np.int64)
        return self._score(order, kept, lambda idx: self.encoder.encode([patients[i] for i in idx]), batch_size)

    def _score(self, order: np.ndarray, kept: np.ndarray, encode, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Run the model over targets in `order`, batched as `predict_proba` says; `encode(indices)`
        gives a target subset's `Batch`, `kept[i]` target i's visit slots."""
        n = len(order)
        prob = np.empty((n, len(self.med_codes)), dtype=np.float32)
        unknown = np.empty(n, dtype=np.int64)
        widths = kept[order].tolist()
        start = 0
        while start < n:
            width = widths[min(start + batch_size, n) - 1]  # sorted: the last is the widest
            size = max(1, min(batch_size, VISIT_SLOTS // width))
            idx = order[start : start + size]
            batch: Batch = encode(idx)
            prob[idx] = self.session.run(None, batch.inputs())[0]
            unknown[idx] = batch.unknown
            start += size
        return prob, unknown

    def predict(self, chunk: VisitTable | list[Patient], *, all_visits: bool = False, batch_size: int = 1024) -> Scored:
        """Score each patient's last visit, or every visit (`all_visits`, each with its own history).

        A `VisitTable` (what `read_patients` yields) is encoded in whole-chunk passes
        (`visit_table.encode_table`); a list of `Patient`s through `Encoder.encode`, the same arrays."""
        if isinstance(chunk, VisitTable):
            codes = encode_table(self.encoder, chunk)
            counts = np.diff(chunk.starts)
            if all_visits:
                ends = np.arange(len(chunk.visit_ids))
                pids = [chunk.patient_ids[i] for i in np.repeat(np.arange(len(chunk)), counts).tolist()]
                vids = list(chunk.visit_ids)
            else:
                ends = chunk.starts[1:] - 1
                pids, vids = list(chunk.patient_ids), [chunk.visit_ids[e] for e in ends.tolist()]
            prob, unknown = self._score(codes.size_order(ends), codes.kept(ends), lambda idx: codes.batch(ends[idx]),
                                        batch_size)
            return Scored(pids, vids, prob, unknown)
        pids, vids, histories = [], [], []
        for p in chunk:
            ends = range(1, len(p.visits) + 1) if all_visits else (len(p.visits),)
            for e in ends:
                pids.append(p.patient_id)
                vids.append(p.visit_ids[e - 1])
                histories.append(p.visits[:e])
        prob, unknown = self.predict_proba(histories, batch_size=batch_size)
        return Scored(pids, vids, prob, unknown)


def size_order(patients: list[list[RawVisit]], max_visits: int) -> list[int]:
    """Patient indices sorted by (kept visits, diagnoses + procedures): batches of neighbours pad
    to similar widths. Unsorted batches of 1024 synth patients pad to ~8 visits x 32 codes and run
    ~4x slower than sorted ones (ORT fp32 531 vs 1,969 patients/s, benchmarks/results/predict.md)."""
    cost = [(min(len(p), max_visits), sum(len(v.diagnoses) + len(v.procedures) for v in p[-max_visits:])) for p in patients]
    return sorted(range(len(patients)), key=cost.__getitem__)


def read_manifest(directory: Path) -> dict:
    """The manifest of a bundle directory, checked for the fields the runtime needs."""
    path = directory / MANIFEST
    if not path.is_file():
        raise RuntimeError(f"{directory} is not a leader-edge bundle (no {MANIFEST}); make one with `leader-edge export RUN --out DIR`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RuntimeError(f"{path} is not valid JSON ({e}); export the bundle again") from None
    if manifest.get("format_version") != BUNDLE_FORMAT:
        raise RuntimeError(f"{path}: bundle format {manifest.get('format_version')!r}, this leader-edge reads "
                           f"{BUNDLE_FORMAT}; export the bundle again with this version")
    missing = [k for k in ("encoder", "threshold", "model") if k not in manifest]
    if missing:
        raise RuntimeError(f"{path} lacks {missing}; export the bundle again")
    return manifest


def predict_file(bundle: Bundle, input_path: str, output: str, *, fmt: str = "csv", all_visits: bool = False,
                 top_k: int | None = None, threshold: float | None = None, batch_size: int = 1024) -> dict:
    """Stream `input_path` ("-" = stdin) through the bundle into `output` ("-" = stdout).

    The output goes to a temp file first (beside `output`, or in the temp dir for stdout) and is
    renamed (or copied to stdout) only when the whole input was read without error.

    Returns:
        {"patients", "visits", "unknown_codes", "visits_with_unknown"}.
    """
    import os
    import shutil
    from concurrent.futures import ThreadPoolExecutor
    import sys
    import tempfile

    if input_path == "-":
        stream, name = sys.stdin.buffer, "<stdin>"
    else:
        try:
            stream, name = open(input_path, "rb", buffering=1 << 20), input_path
        except (FileNotFoundError, IsADirectoryError):
            raise DataError(input_path, "no such file", fix="pass a visits CSV, or - to read standard input") from None
    target = None if output == "-" else Path(output)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name if target else 'predict'}.", dir=target.parent if target else None)
    stats = {"patients": 0, "visits": 0, "unknown_codes": 0, "visits_with_unknown": 0}
    try:
        with stream, os.fdopen(fd, "wb") as out:
            if fmt == "csv":
                out.write(",".join(OUTPUT_COLUMNS).encode() + b"\n")  # no column name needs quoting
            plain = plain_codes(bundle.med_codes)

            def emit(scored: Scored, n_patients: int) -> None:
                if fmt == "csv":
                    out.write(csv_chunk(bundle, scored, plain_codes=plain, threshold=threshold, top_k=top_k))
                else:
                    rows = format_rows(bundle, scored, fmt=fmt, threshold=threshold, top_k=top_k)
                    out.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows).encode())
                stats["patients"] += n_patients
                stats["visits"] += len(scored.visit_ids)
                stats["unknown_codes"] += int(scored.unknown.sum())
                stats["visits_with_unknown"] += int((scored.unknown > 0).sum())

            # onnxruntime releases the GIL: the model scores chunk i while this thread reads chunk
            # i + 1 and formats chunk i - 1. No gain on the 2-core VM at load ~3, where the process
            # gets about one core (100k patients: 6.98-7.00 s vs 6.45-6.80 s in one thread); it is
            # for idle multi-core bedside machines.
            with ThreadPoolExecutor(1) as pool:
                pending = None
                for chunk in read_patients(stream, name):
                    future = pool.submit(bundle.predict, chunk, all_visits=all_visits, batch_size=batch_size)
                    if pending is not None:
                        emit(pending[0].result(), pending[1])
                    pending = (future, len(chunk))
                if pending is not None:
                    emit(pending[0].result(), pending[1])
        if target is None:
            with open(tmp, "rb") as f:
                shutil.copyfileobj(f, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            os.unlink(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return stats
