"""The bedside runtime: a validated bundle + a visits CSV -> recommendations. No torch.

Imports only onnxruntime, numpy, the standard library and torch-free leader_edge modules
(`encoding`, `visit_stream`, `dataset`'s parsing helpers, `errors`), so `leader-edge predict`
starts in ~0.3 s.

    bundle = Bundle.load("bundle/")                      # checks the model's sha256
    for chunk in read_patients(open("visits.csv", "rb"), "visits.csv"):
        result = bundle.predict(chunk)                   # one row per predicted visit

Streaming (`leader_edge.visit_stream`): patients arrive in chunks, so memory is set by the chunk
and batch sizes (~0.5 GB peak for the whole CLI on 100k synth patients, most of it onnxruntime's
arena) plus the file-wide duplicate checks, measured at ~60 bytes per row of peak growth (155 MB
after 1M rows against 97 MB after 20k; ~0.6 GB more at 10M rows).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leader_edge.encoding import Encoder, RawVisit
from leader_edge.errors import DataError
from leader_edge.visit_stream import Patient, read_patients

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
        n = len(patients)
        prob = np.empty((n, len(self.med_codes)), dtype=np.float32)
        unknown = np.empty(n, dtype=np.int64)
        k = self.encoder.max_visits
        order = size_order(patients, k)
        start = 0
        while start < n:
            width = min(len(patients[order[min(start + batch_size, n) - 1]]), k)  # sorted: the last is the widest
            size = max(1, min(batch_size, VISIT_SLOTS // width))
            idx = order[start : start + size]
            batch = self.encoder.encode([patients[i] for i in idx])
            prob[idx] = self.session.run(None, batch.inputs())[0]
            unknown[idx] = batch.unknown
            start += size
        return prob, unknown

    def predict(self, chunk: list[Patient], *, all_visits: bool = False, batch_size: int = 1024) -> Scored:
        """Score each patient's last visit, or every visit (`all_visits`, each with its own history)."""
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


# ---------------------------------------------------------------------------------------------
# Formatting recommendations

OUTPUT_COLUMNS = ("patient_id", "visit_id", "medications", "scores", "ddi_warnings", "unknown_codes")
_NEEDS_QUOTES = re.compile('[,"\r\n]')  # characters that make csv.writer quote a field
_PROB_TEXT = [f"{q / 10_000:.4f}" for q in range(10_001)]  # 4 decimals as in recs.py, formatted once
# The same as NUL-padded bytes ":0.1234;" (row 10_001 all NUL: "not listed"), for `_join_tokens`.
_PROB_BYTES = np.frombuffer("".join(f":{t};" for t in _PROB_TEXT).encode() + bytes(8), dtype=np.uint8).reshape(-1, 8)


def recommend(y_prob: np.ndarray, *, threshold: float, top_k: int | None = None) -> np.ndarray:
    """bool [N, M]: probability >= threshold, or (top_k) the k most probable medications."""
    if top_k is None:
        return y_prob >= threshold
    out = np.zeros(y_prob.shape, dtype=bool)
    k = min(top_k, y_prob.shape[1])
    if k > 0:
        top = np.argpartition(-y_prob, k - 1, axis=1)[:, :k]
        np.put_along_axis(out, top, True, axis=1)
    return out


def _code_bytes(codes: list[str], suffix: str) -> np.ndarray:
    """uint8 [M + 1, W]: each code's UTF-8 bytes + `suffix`, NUL-padded; the last row all NUL."""
    if any("\0" in c for c in codes):
        raise ValueError("a medication code contains a NUL character; re-export the bundle from a dataset without it")
    raw = [(c + suffix).encode() for c in codes]
    out = np.zeros((len(raw) + 1, max([1, *map(len, raw)])), dtype=np.uint8)
    for i, b in enumerate(raw):
        out[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    return out


def _join_tokens(tokens: np.ndarray) -> list[str]:
    """Per row, the concatenation of its tokens with the NUL padding dropped and the last byte (the
    trailing ';') cut: uint8 [N, T, W] -> N strings. One numpy pass for the whole chunk instead of a
    Python join over ~130 `code:prob` pieces per row (11.6 s of 100k patients' ~55 s before)."""
    flat = tokens.reshape(len(tokens), -1)
    nonzero = flat != 0
    buf = flat[nonzero].tobytes()  # rows back to back, in row order
    ends = np.cumsum(nonzero.sum(1)).tolist()
    starts = [0, *ends[:-1]]
    return [buf[a : b - 1].decode() if b > a else "" for a, b in zip(starts, ends)]


def format_rows(bundle: Bundle, scored: Scored, *, fmt: str = "csv", threshold: float | None = None,
                top_k: int | None = None) -> Iterable[list | dict]:
    """Output records (CSV field lists or JSON objects, columns `OUTPUT_COLUMNS`) for a scored chunk.

    `medications` and `scores` list codes highest probability first; `scores` holds every code whose
    probability rounds to >= 0.0001 (as `recs.write_predictions`), `ddi_warnings` the interacting
    pairs inside the recommendation as `A+B`, `unknown_codes` the count of codes outside the vocabulary.
    """
    prob = scored.y_prob
    n, m = prob.shape
    rec = recommend(prob, threshold=bundle.threshold if threshold is None else threshold, top_k=top_k)
    codes = bundle.med_codes
    hits = rec[:, bundle.ddi[:, 0]] & rec[:, bundle.ddi[:, 1]]  # [N, P] interacting pairs inside the recommendation
    order = np.argsort(-prob, axis=1, kind="stable")  # [N, M]
    quant = np.rint(np.take_along_axis(prob, order, axis=1).astype(np.float64) * 10_000).astype(np.int64)  # [N, M] 0..10000, highest first
    rec = np.take_along_axis(rec, order, axis=1)  # [N, M] in score order
    if fmt == "jsonl":
        for i in range(n):
            keep = quant[i] > 0
            kept, kept_q = order[i, keep].tolist(), quant[i, keep].tolist()  # Python ints: numpy scalar indexing is ~5x slower
            yield {"patient_id": scored.patient_ids[i], "visit_id": scored.visit_ids[i],
                   "medications": [codes[j] for j in order[i, rec[i]].tolist()],
                   "scores": {codes[j]: v / 10_000 for j, v in zip(kept, kept_q)},
                   "ddi_warnings": [[codes[a], codes[b]] for a, b in bundle.ddi[hits[i]].tolist()],
                   "unknown_codes": int(scored.unknown[i])}
        return
    # Listed entries padded to the last listed position of any row: for `scores` (a prefix of the
    # score order, rint being monotone) most of the 130 columns; for `medications` ~15.
    kept = quant > 0
    width = int(kept.sum(1).max(initial=0))
    names = _code_bytes(codes, "")
    tokens = np.concatenate([names[np.where(kept[:, :width], order[:, :width], m)],  # [N, width, Wc] + [N, width, 8]
                             _PROB_BYTES[np.where(kept[:, :width], np.minimum(quant[:, :width], 10_000), -1)]], axis=2)
    scores = _join_tokens(tokens)
    last = int((rec * np.arange(1, m + 1)).max(initial=0))
    meds = _join_tokens(_code_bytes(codes, ";")[np.where(rec[:, :last], order[:, :last], m)])
    n_pairs = len(bundle.ddi)
    last = int((hits * np.arange(1, n_pairs + 1)).max(initial=0))
    pair_names = _code_bytes([f"{codes[a]}+{codes[b]}" for a, b in bundle.ddi.tolist()], ";")
    warnings = _join_tokens(pair_names[np.where(hits[:, :last], np.arange(last), n_pairs)])
    for i in range(n):
        yield [scored.patient_ids[i], scored.visit_ids[i], meds[i], scores[i], warnings[i], int(scored.unknown[i])]


def csv_text(rows: Iterable[list], *, plain_codes: bool) -> str:
    """CSV lines for `format_rows` records, byte-identical to `csv.writer(lineterminator="\\n")`.

    csv.writer scans every character for quoting and cost ~21 us per row of ~130 scores (more than
    the formatting itself). When no field can need quotes - `plain_codes` (no medication code holds
    `,` `"` CR or LF; the score, medication and warning fields are built from codes, digits, `:;+.`)
    and no id of the chunk does either - the fields are joined directly; otherwise csv.writer runs.
    """
    rows = rows if isinstance(rows, list) else list(rows)
    if plain_codes and not _NEEDS_QUOTES.search("".join(r[0] + r[1] for r in rows)):
        return "".join(f"{a},{b},{c},{d},{e},{f}\n" for a, b, c, d, e, f in rows)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def plain_codes(codes: list[str]) -> bool:
    """True when no code needs CSV quoting (see `csv_text`)."""
    return not any(_NEEDS_QUOTES.search(c) for c in codes)


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
        with stream, os.fdopen(fd, "w", newline="", encoding="utf-8") as out:
            writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
            if writer:
                writer.writerow(OUTPUT_COLUMNS)
            plain = plain_codes(bundle.med_codes)

            def emit(scored: Scored, n_patients: int) -> None:
                rows = format_rows(bundle, scored, fmt=fmt, threshold=threshold, top_k=top_k)
                if writer:
                    out.write(csv_text(list(rows), plain_codes=plain))
                else:
                    out.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)
                stats["patients"] += n_patients
                stats["visits"] += len(scored.visit_ids)
                stats["unknown_codes"] += int(scored.unknown.sum())
                stats["visits_with_unknown"] += int((scored.unknown > 0).sum())

            # onnxruntime releases the GIL: the model scores chunk i while this thread reads chunk
            # i + 1 and formats chunk i - 1. No gain measured on the loaded 2-core VM (68.8 s vs
            # 67.2 s for 100k patients); it is for idle multi-core bedside machines.
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
