"""The bedside runtime: a validated bundle + a visits CSV -> recommendations. No torch.

Imports only onnxruntime, numpy, the standard library and torch-free leader_edge modules
(`encoding`, `visit_stream`, `visit_table`, `formatting`, `dataset`'s parsing helpers, `errors`),
so `leader-edge predict` starts in ~0.3 s.

    bundle = Bundle.load("bundle/")                      # proves the bundle (below) or refuses it
    for chunk in read_patients(open("visits.csv", "rb"), "visits.csv"):   # VisitTable chunks
        result = bundle.predict(chunk)                   # one row per predicted visit
        text = csv_chunk(bundle, result, plain_codes=plain_codes(bundle.med_codes))

A bundle proves itself at load (`read_manifest`, then `Bundle.load`), and every refusal is a
`DataError` naming the file, the manifest field and the fix (export again):
1. manifest.json: a regular file, JSON, format `BUNDLE_FORMAT`; its `digest.sha256` is the sha256
   of the canonical JSON (`canonical_json`) of every other field, so no field can change unseen.
2. `files` lists every other file of the bundle by bare name with its size and sha256, so the one
   digest covers every byte. A listed name must be a regular file in the bundle directory (no path,
   no symlink, no device: nothing outside the bundle is ever opened); an unlisted file is refused
   (only `signature.json` may sit beside them: it signs the digest, so it cannot be in it).
3. The manifest's meaning: threshold a number in [0, 1]; positive integer caps; profile fields as
   the encoder's; DDI pairs of two distinct medications of the vocabulary.
4. With `trust=PUBKEY`: signature.json holds a valid Ed25519 signature of the digest by that key.
5. model.onnx: onnxruntime loads it; its inputs, output width (= medications), profile width and
   the vocabulary sizes stamped in its metadata at export equal the manifest's.
6. The self-test: patients recorded at export (raw codes, so a reordered vocabulary shows) are
   scored and must give finite probabilities equal to the recorded ones within `SELFTEST_ATOL`.

Streaming (`leader_edge.visit_stream`): patients arrive in chunks, so memory is set by the chunk
and batch sizes (~0.5 GB peak for the whole CLI on 100k synth patients, most of it onnxruntime's
arena) plus the file-wide duplicate checks, measured at ~60 bytes per row of peak growth (155 MB
after 1M rows against 97 MB after 20k; ~0.6 GB more at 10M rows).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leader_edge.encoding import INPUT_NAMES, Batch, Encoder, RawVisit
from leader_edge.errors import DataError
from leader_edge.formatting import OUTPUT_COLUMNS, csv_chunk, format_rows, plain_codes
from leader_edge.visit_stream import Patient, read_patients
from leader_edge.visit_table import VisitTable, encode_table

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 2  # 2: digest over every field and file, self-test, vocabulary sizes in the model
MANIFEST = "manifest.json"
MODEL = "model.onnx"
SELFTEST = "selftest.json"
SIGNATURE = "signature.json"  # beside the listed files: it signs the digest, so it cannot be in it
VISIT_SLOTS = 2048  # padded visit slots per model call (see Bundle.predict_proba)
MAX_MANIFEST_BYTES = 64 << 20  # a 150k-code vocabulary is ~3 MB; anything larger is not ours
# max |p - p_recorded| of the self-test, by model variant. On the exporting machine every variant
# reproduces the recorded probabilities exactly (0 measured). Another CPU may take other MLAS
# kernels: fp32 arithmetic (fp32, int8-weights) then sums in another order (~1e-6), and int8
# activations may round to the neighbouring step (~1e-3 in a probability). The altered bundles of
# tests/test_faults_bundle.py move them by 0.1-0.98.
SELFTEST_ATOL = {"fp32": 1e-4, "int8-weights": 1e-4, "int8-static": 5e-3, "int8-dynamic": 5e-3}
# ONNX metadata keys stamped by the export: the sizes of the model's own tables.
MODEL_SIZES = ("n_codes", "n_meds", "n_profile_ids", "max_visits")
METADATA_PREFIX = "leader_edge."
SIGNED_PREFIX = b"leader-edge bundle digest v2\n"  # what is signed: this + the hex digest
# `predict` refuses a file when more than this share of the codes the model reads are unknown to it
# (--allow-unknown writes it anyway). A few new codes are expected (rare codes outside the training
# vocabulary; 0 on the 100k synth patients of the benchmark); half of them unknown is another
# vocabulary (MIMIC-IV's ICD9_/ICD10_ codes against a MIMIC-III bundle: 100%), whose
# recommendations would rest on the profile and the few codes the model knows.
MAX_UNKNOWN_SHARE = 0.5
REEXPORT = "export the bundle again with `leader-edge export RUN --out DIR` (and --sign KEY if it was signed)"


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def canonical_json(value) -> bytes:
    """The one byte form the digest is taken of: sorted keys, no spaces, ASCII. NaN is written as
    `NaN` here so that a manifest holding one is reported by field, not by a parse error."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def manifest_digest(manifest: dict) -> dict:
    """`{"sha256": digest of every field but "digest", "fields": {dotted path: sha256}}`.

    The digest is taken of the whole canonical manifest (unambiguous); `fields` (values down to
    three levels, e.g. `encoder.codes.medication`) only names what changed when it fails."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return {"sha256": hashlib.sha256(canonical_json(body)).hexdigest(), "fields": _field_digests(body)}


def _field_digests(value: dict, prefix: str = "", depth: int = 3) -> dict[str, str]:
    out = {}
    for key, v in value.items():
        path = f"{prefix}{key}"
        if isinstance(v, dict) and v and depth > 1:
            out.update(_field_digests(v, path + ".", depth - 1))
        else:
            out[path] = hashlib.sha256(canonical_json(v)).hexdigest()[:16]
    return out


def signed_message(digest: str) -> bytes:
    """The bytes an Ed25519 bundle signature signs (domain-separated: no other message matches)."""
    return SIGNED_PREFIX + digest.encode("ascii")


def _field_error(path: Path, field: str, problem: str, fix: str = REEXPORT) -> DataError:
    return DataError(path, f"field '{field}' {problem}", fix=fix)


def _bare_name(name) -> bool:
    """A file name with no directory part: what `files`, `model.file` and `selftest.file` hold."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0:")
            and Path(name).name == name)


def _regular_file(path: Path, field: str | None = None) -> os.stat_result:
    """lstat of a bundle file that must be a regular file (never followed, never opened otherwise);
    `field`: the manifest field that lists it."""
    listed = f" ({MANIFEST} field '{field}')" if field else ""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise DataError(path, f"is missing{listed}", fix=REEXPORT) from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise DataError(path, f"is {kind}; a bundle holds regular files only{listed}", fix=REEXPORT)
    return st


# ---------------------------------------------------------------------------------------------
# The bundle and the model


@dataclass
class Scored:
    """Predicted visits of one chunk: N rows, M medications (bundle order)."""

    patient_ids: list[str]
    visit_ids: list[str]
    y_prob: np.ndarray  # float32 [N, M]
    # int64 [N] codes the model did not read, in the visits it read: outside its vocabulary, or beyond
    # its per-visit limit (`encoder.max_codes` per kind; those also in `over_limit`). The output's
    # `unknown_codes` column.
    unknown: np.ndarray
    over_limit: np.ndarray | None = None  # int64 [N] known codes beyond the per-visit limit (None: 0)
    codes: np.ndarray | None = None  # int64 [N] codes as written in the visits the model read


class Bundle:
    """A bundle directory (manifest.json, model.onnx, selftest.json) opened for inference.

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
        pairs = [(index[a], index[b]) for a, b in manifest.get("ddi_pairs", [])]  # read_manifest checked them
        self.ddi = np.array(pairs, dtype=np.int64).reshape(-1, 2)

    @classmethod
    def load(cls, path: str | Path, *, threads: int = 0, trust: str | Path | None = None) -> "Bundle":
        """Open a bundle that proves itself (see the module docstring), or refuse it.

        Args:
            path: the bundle directory written by `leader-edge export`.
            threads: onnxruntime intra-op threads; 0 lets it use every physical core.
            trust: an Ed25519 public key (PEM); the bundle must then carry a valid signature by it.

        Raises:
            DataError: the bundle, one of its files or a manifest field fails a check; the message
                names the file, the field and what to do.
        """
        d = Path(path)
        manifest = read_manifest(d)
        if trust is not None:
            verify_signature(d, manifest, Path(trust))
        model = d / manifest["model"]["file"]
        bundle = cls(d, manifest, open_session(model, threads))
        bundle.check_model()
        bundle.self_test()
        return bundle

    def check_model(self) -> None:
        """The model's inputs, output width, profile width and stamped table sizes against the manifest."""
        model = self.path / self.manifest["model"]["file"]
        names = [i.name for i in self.session.get_inputs()]
        if names != list(INPUT_NAMES):
            raise DataError(model, f"has inputs {names}; a leader-edge student takes {list(INPUT_NAMES)}", fix=REEXPORT)
        (out, *_) = self.session.get_outputs()
        width = out.shape[1] if len(out.shape) == 2 else None
        if width != self.encoder.n_meds:
            raise DataError(model, f"outputs {width} medication columns but manifest.json field 'encoder.codes.medication' "
                                   f"lists {self.encoder.n_meds}", fix=REEXPORT)
        shape = self.session.get_inputs()[INPUT_NAMES.index("profile")].shape
        fields = shape[1] if len(shape) == 2 else None
        if fields != max(len(self.encoder.profile_fields), 1):
            raise DataError(model, f"takes {fields} profile field(s) but manifest.json field 'encoder.profile_values' has "
                                   f"{len(self.encoder.profile_fields)}", fix=REEXPORT)
        meta = self.session.get_modelmeta().custom_metadata_map
        want = {"n_codes": self.encoder.n_codes, "n_meds": self.encoder.n_meds, "n_profile_ids": self.encoder.n_profile_ids}
        for name in MODEL_SIZES:
            got = meta.get(METADATA_PREFIX + name)
            if got is None or not got.isdigit():
                raise DataError(model, f"carries no table size '{METADATA_PREFIX}{name}' in its metadata: it was not "
                                       "written by `leader-edge export`", fix=REEXPORT)
            if name == "max_visits":
                if self.encoder.max_visits > int(got):
                    raise _field_error(self.path / MANIFEST, "encoder.max_visits", f"is {self.encoder.max_visits}, more "
                                       f"visits than the model's position table ({got})")
            elif int(got) != want[name]:
                source = {"n_codes": "encoder.codes", "n_meds": "encoder.codes.medication",
                          "n_profile_ids": "encoder.profile_values"}[name]
                raise DataError(model, f"has {got} rows in its {name[2:]} table but manifest.json field '{source}' "
                                       f"gives {want[name]}", fix=REEXPORT)

    def self_test(self) -> float:
        """Score the self-test patients recorded at export; return max |p - p_recorded|.

        Raises:
            DataError: non-finite probabilities, or a difference over `SELFTEST_ATOL`."""
        spec = self.manifest["selftest"]
        path = self.path / spec["file"]
        try:
            test = json.loads(path.read_text(encoding="utf-8"))
            patients = [[RawVisit(v["diagnoses"], v["procedures"], v["medications"], v["profile"]) for v in p]
                        for p in test["patients"]]
            want = np.array(test["probabilities"], dtype=np.float64)
            if not patients or not all(patients) or want.shape != (len(patients), len(test["medications"])):
                raise ValueError(f"{len(patients)} patients, probabilities of shape {want.shape}")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise DataError(path, f"is not a self-test batch for this bundle ({type(e).__name__}: {e})", fix=REEXPORT) from None
        if test["medications"] != self.med_codes:  # columns are positional: a reordered vocabulary relabels them
            raise DataError(self.path / MANIFEST, f"field 'encoder.codes.medication' lists the medications in another "
                                                  f"order (or other ones) than the model's columns recorded in {path.name}",
                            fix=REEXPORT)
        got, _ = self.predict_proba(patients)
        model = self.path / self.manifest["model"]["file"]
        if not np.isfinite(got).all():
            bad = int((~np.isfinite(got)).any(axis=1).sum())
            raise DataError(model, f"gives NaN or infinite probabilities for {bad} of the {len(patients)} self-test "
                                   f"patients ({path.name}, manifest.json field 'selftest')", fix=REEXPORT)
        diff = float(np.abs(got - want).max())
        atol = SELFTEST_ATOL[self.manifest["model"]["variant"]]
        if not diff <= atol:
            raise DataError(model, f"scores the self-test patients of {path.name} up to {diff:.3g} away from the "
                                   f"probabilities recorded at export (tolerance {atol:g}): the model, the vocabulary "
                                   f"(manifest.json field 'encoder') or the runtime (onnxruntime "
                                   f"{_installed('onnxruntime')}, export used "
                                   f"{self.manifest.get('packages', {}).get('onnxruntime', 'unknown')}) changed", fix=REEXPORT)
        return diff

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
            written, over = codes.read_counts(ends)
            return Scored(pids, vids, prob, unknown + over, over, written)
        pids, vids, histories = [], [], []
        for p in chunk:
            ends = range(1, len(p.visits) + 1) if all_visits else (len(p.visits),)
            for e in ends:
                pids.append(p.patient_id)
                vids.append(p.visit_ids[e - 1])
                histories.append(p.visits[:e])
        prob, unknown = self.predict_proba(histories, batch_size=batch_size)
        written, over = read_counts(self.encoder, histories)
        return Scored(pids, vids, prob, unknown + over, over, written)


def read_counts(encoder: Encoder, histories: list[list[RawVisit]]) -> tuple[np.ndarray, np.ndarray]:
    """(int64 [N] codes as written, int64 [N] distinct known codes beyond `encoder.max_codes` per
    visit and kind) in what the model reads of each history: `TableCodes.read_counts`, per patient."""
    k, cap = encoder.max_visits, encoder.max_codes
    written, over = np.zeros(len(histories), dtype=np.int64), np.zeros(len(histories), dtype=np.int64)
    for i, history in enumerate(histories):
        kept = history[-k:]
        for j, v in enumerate(kept):
            lists = [("diagnosis", v.diagnoses), ("procedure", v.procedures)]
            if j + 1 < len(kept):  # the current visit's medications are never read
                lists.append(("medication", v.medications))
            for kind, codes in lists:
                index = encoder._index[kind]
                written[i] += len(codes)
                over[i] += max(0, len({c for c in codes if c in index}) - cap)
    return written, over


def size_order(patients: list[list[RawVisit]], max_visits: int) -> list[int]:
    """Patient indices sorted by (kept visits, diagnoses + procedures): batches of neighbours pad
    to similar widths. Unsorted batches of 1024 synth patients pad to ~8 visits x 32 codes and run
    ~4x slower than sorted ones (ORT fp32 531 vs 1,969 patients/s, benchmarks/results/predict.md)."""
    cost = [(min(len(p), max_visits), sum(len(v.diagnoses) + len(v.procedures) for v in p[-max_visits:])) for p in patients]
    return sorted(range(len(patients)), key=cost.__getitem__)


def read_manifest(directory: Path) -> dict:
    """The manifest of a bundle directory, proven against its digest, its files and its meaning.

    Raises:
        DataError: naming the file, the field and the fix (see the module docstring, steps 1-3).
    """
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir() or not os.path.lexists(path):
        raise DataError(directory, f"is not a leader-edge bundle (no {MANIFEST})",
                        fix="make one with `leader-edge export RUN --out DIR`")
    st = _regular_file(path)
    if st.st_size > MAX_MANIFEST_BYTES:
        raise DataError(path, f"is {st.st_size:,} bytes, more than a manifest ({MAX_MANIFEST_BYTES:,})", fix=REEXPORT)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"is not valid JSON ({e})", fix=REEXPORT) from None
    if not isinstance(manifest, dict):
        raise DataError(path, "is not a JSON object", fix=REEXPORT)
    if manifest.get("format_version") != BUNDLE_FORMAT:
        raise _field_error(path, "format_version", f"is {manifest.get('format_version')!r}; this leader-edge reads "
                                                   f"bundle format {BUNDLE_FORMAT}")
    _check_digest(path, manifest)
    _check_files(Path(directory), path, manifest)
    _check_meaning(path, manifest)
    return manifest


def _check_digest(path: Path, manifest: dict) -> None:
    stored = manifest.get("digest")
    if not isinstance(stored, dict) or not isinstance(stored.get("sha256"), str):
        raise _field_error(path, "digest", "is missing or not {\"sha256\": ..., \"fields\": ...}")
    now = manifest_digest(manifest)
    if now["sha256"] == stored["sha256"]:
        return
    old = stored.get("fields") if isinstance(stored.get("fields"), dict) else {}
    changed = sorted(k for k in set(old) | set(now["fields"]) if old.get(k) != now["fields"].get(k))
    if not changed or not old:
        raise _field_error(path, "digest", "does not match the manifest (edited or damaged after export)")
    names = ", ".join(f"'{k}'" for k in changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    raise DataError(path, f"field{'s' if len(changed) > 1 else ''} {names} changed after export (the bundle's "
                          "digest no longer matches)", fix=REEXPORT)


def _check_files(directory: Path, path: Path, manifest: dict) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise _field_error(path, "files", "is missing or empty; it lists every file of the bundle")
    for name, entry in files.items():
        field = f"files.{name}"
        if not _bare_name(name) or name in (MANIFEST, SIGNATURE):
            raise _field_error(path, field, "is not a bare file name of the bundle directory (no path, no '..')")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or type(entry.get("bytes")) is not int:
            raise _field_error(path, field, "is not {\"sha256\": hex, \"bytes\": int}")
        st = _regular_file(directory / name, field)
        if st.st_size != entry["bytes"]:
            raise DataError(directory / name, f"is {st.st_size:,} bytes; {MANIFEST} field '{field}.bytes' says "
                                              f"{entry['bytes']:,} (changed or damaged after export)", fix=REEXPORT)
        digest = sha256(directory / name)
        if digest != entry["sha256"]:
            raise DataError(directory / name, f"has sha256 {digest[:16]}..., {MANIFEST} field '{field}.sha256' says "
                                              f"{entry['sha256'][:16]}... (changed or damaged after export)", fix=REEXPORT)
    for entry in sorted(os.listdir(directory)):
        if entry not in files and entry not in (MANIFEST, SIGNATURE):
            raise DataError(directory / entry, f"is not listed in {MANIFEST} field 'files'; a bundle holds only the "
                                               "files its digest covers", fix=f"remove it, or {REEXPORT}")
    for field in ("model", "selftest"):
        name = manifest.get(field, {}).get("file") if isinstance(manifest.get(field), dict) else None
        if name not in files:
            raise _field_error(path, f"{field}.file", f"is {name!r}, not a file listed in field 'files'")


def _check_meaning(path: Path, manifest: dict) -> None:
    """Threshold, caps, vocabulary, profile fields and DDI pairs make sense together."""
    t = manifest.get("threshold")
    if type(t) not in (int, float) or not math.isfinite(t) or not 0 <= t <= 1:
        raise _field_error(path, "threshold", f"is {t!r}; a decision threshold is a number in [0, 1]")
    enc = manifest.get("encoder")
    if not isinstance(enc, dict):
        raise _field_error(path, "encoder", "is missing")
    for cap in ("max_visits", "max_codes"):
        if type(enc.get(cap)) is not int or enc[cap] < 1:
            raise _field_error(path, f"encoder.{cap}", f"is {enc.get(cap)!r}; it must be a positive integer")
    codes = enc.get("codes")
    for kind in ("diagnosis", "procedure", "medication"):
        vocab = codes.get(kind) if isinstance(codes, dict) else None
        if not isinstance(vocab, list) or not all(isinstance(c, str) and c for c in vocab):
            raise _field_error(path, f"encoder.codes.{kind}", "is not a list of codes")
        if len(set(vocab)) != len(vocab):
            raise _field_error(path, f"encoder.codes.{kind}", "lists a code twice")
    if not codes["medication"]:
        raise _field_error(path, "encoder.codes.medication", "is empty; the model recommends from it")
    try:
        encoder = Encoder.from_json(enc)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise _field_error(path, "encoder", f"is not a valid encoder ({e})") from None
    if manifest.get("profile_fields") != encoder.profile_fields:
        raise _field_error(path, "profile_fields", f"is {manifest.get('profile_fields')!r}, not the encoder's "
                                                   f"{encoder.profile_fields}")
    meds = set(encoder.codes["medication"])
    pairs = manifest.get("ddi_pairs")
    if not isinstance(pairs, list):
        raise _field_error(path, "ddi_pairs", "is missing or not a list of [medication, medication] pairs")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2 and pair[0] != pair[1] and all(p in meds for p in pair)):
            raise _field_error(path, f"ddi_pairs[{i}]", f"is {pair!r}, not two different medications of "
                                                        "'encoder.codes.medication'")
    model, test = manifest.get("model"), manifest.get("selftest")
    variant = model.get("variant") if isinstance(model, dict) else None
    if not isinstance(variant, str) or variant not in SELFTEST_ATOL:
        raise _field_error(path, "model.variant", f"is {variant!r}; a bundle holds one of {list(SELFTEST_ATOL)}")
    if not isinstance(test, dict):
        raise _field_error(path, "selftest", "is missing; the runtime scores the self-test batch it names")


def open_session(model: Path, threads: int = 0):
    """An onnxruntime session on one bundle model file (already proven by `read_manifest`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings about unused initializers are noise for the user
    # Idle intra-op threads sleep instead of spinning: they spun on the cores that read and
    # format the next chunks (predict_file, 100k patients, 2-core VM at load ~3.3: 8,546 and
    # 8,867 patients/s spinning vs 10,664 and 11,162 not).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own error types (InvalidArgument, Fail, ...) derive from Exception
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(model, f"onnxruntime cannot load it ({first})", fix=REEXPORT) from None


def verify_signature(directory: Path, manifest: dict, public_key: Path) -> None:
    """Refuse a bundle without a valid Ed25519 signature of its digest by `public_key` (PEM).

    Raises:
        DataError: no key, not an Ed25519 public key, no or bad signature.json, a wrong signature.
    """
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError:
        raise RuntimeError("--trust needs the `cryptography` package; install leader-edge with its dependencies") from None
    import base64

    try:
        key = load_pem_public_key(public_key.read_bytes())
    except (OSError, ValueError) as e:
        raise DataError(public_key, f"is not a PEM public key ({e})",
                        fix="pass the PEM public key of the export's --sign key (`openssl pkey -in KEY -pubout`)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise DataError(public_key, f"is a {type(key).__name__}, not an Ed25519 public key",
                        fix="sign and trust with Ed25519 keys (`openssl genpkey -algorithm ed25519`)")
    path = directory / SIGNATURE
    if not os.path.lexists(path):
        raise DataError(path, "is missing: the bundle is unsigned and --trust requires a signature",
                        fix="export it again with `leader-edge export RUN --out DIR --sign KEY`")
    if _regular_file(path).st_size > 1 << 16:
        raise DataError(path, "is larger than a signature (64 KiB)", fix=REEXPORT)
    try:
        sig = json.loads(path.read_bytes().decode("utf-8"))
        signature = base64.b64decode(sig["signature"], validate=True)
        signed = sig["digest"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(path, f"is not a leader-edge signature ({e})", fix=REEXPORT) from None
    if signed != manifest["digest"]["sha256"]:
        raise _field_error(path, "digest", f"is {str(signed)[:16]}..., not this bundle's digest "
                                           f"{manifest['digest']['sha256'][:16]}... (signs another bundle)")
    try:
        key.verify(signature, signed_message(signed))
    except InvalidSignature:
        raise DataError(path, f"field 'signature' does not verify with {public_key}: the bundle was signed by "
                              "another key or changed after signing",
                        fix="trust the key that signed it, or export and sign it again") from None


def _installed(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def predict_file(bundle: Bundle, input_path: str, output: str, *, fmt: str = "csv", all_visits: bool = False,
                 top_k: int | None = None, threshold: float | None = None, batch_size: int = 1024,
                 max_unknown: float | None = MAX_UNKNOWN_SHARE) -> dict:
    """Stream `input_path` ("-" = stdin) through the bundle into `output` ("-" = stdout).

    Nothing is lost or left behind:
    - an `output` that is the input file (by any path: a symlink, `./x` for `x`, a hard link), lies
      in the bundle directory or is a directory is refused before anything is written;
    - the output goes to a hidden temp file first (beside `output`, or in the temp dir for stdout),
      renamed (or copied to stdout) only when the whole input was read without error; the rename
      is atomic, so `output` is either the old file or the complete new one;
    - SIGTERM and SIGINT raise `Interrupted` (exit 128 + signal) and the temp file is removed; the
      temp file of a run killed outright (SIGKILL, power loss) carries the host and process id in
      its name (`.NAME.leader-edge.HOST.PID.XXXX.tmp`) and is removed by the next run once that
      process is gone, or else ignored;
    - a new output gets the mode the umask gives (0644 under umask 022), a replaced one keeps its mode;
    - a failed write (disk full, quota) names the output and what to do.

    Args:
        max_unknown: refuse the file when more than this share of the codes the model reads are
            outside its vocabulary (None: never). See `MAX_UNKNOWN_SHARE`.

    Returns:
        {"patients", "visits", "codes" (as written, in what the model read), "unknown_codes",
        "visits_with_unknown", "codes_over_limit", "visits_over_limit"}: the unknown counts are
        codes outside the vocabulary, the over-limit ones known codes beyond `encoder.max_codes`
        per visit and kind; the output's `unknown_codes` column holds both.

    Raises:
        DataError: a bad input row (file, line, column), an output refused above, a failed write,
            or more than `max_unknown` of the codes unknown.
        Interrupted: SIGTERM or SIGINT arrived; nothing was written.
    """
    target = None if output == "-" else Path(output)
    if target is not None:
        _check_output(target, input_path, bundle.path)
    if input_path == "-":
        stream, name = sys.stdin.buffer, "<stdin>"
    else:
        try:
            stream, name = open(input_path, "rb", buffering=1 << 20), input_path
        except (FileNotFoundError, IsADirectoryError):
            raise DataError(input_path, "no such file", fix="pass a visits CSV, or - to read standard input") from None
    directory = target.parent if target is not None else Path(tempfile.gettempdir())
    stem = target.name if target is not None else "predict"
    stats = {"patients": 0, "visits": 0, "codes": 0, "unknown_codes": 0, "visits_with_unknown": 0,
             "codes_over_limit": 0, "visits_over_limit": 0}
    tmp = None
    with stream, _signals_raise():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            _remove_stale_temps(directory, stem)
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{stem}.{_temp_tag()}", suffix=".tmp", dir=directory)
            except OSError as e:
                raise _write_error(e, target, directory) from None
            if target is not None:  # mkstemp creates 0600
                os.fchmod(fd, _output_mode(target))
            out = os.fdopen(fd, "wb")

            def put(data: bytes | None) -> None:
                """Write `data`, or (None) flush and close; a failure names the output."""
                try:
                    if data is None:
                        out.close()  # flushes: a full disk may only show here (or, on NFS, only at close)
                    else:
                        out.write(data)
                except OSError as e:
                    raise _write_error(e, target, directory) from None

            try:
                _stream(bundle, stream, name, put, stats, fmt=fmt, all_visits=all_visits, top_k=top_k,
                        threshold=threshold, batch_size=batch_size)
                put(None)
            finally:
                if not out.closed:  # after a failure: the buffer cannot be written either
                    with contextlib.suppress(OSError):
                        out.close()
            share = stats["unknown_codes"] / max(stats["codes"], 1)
            if max_unknown is not None and share > max_unknown:
                raise DataError(name, f"{stats['unknown_codes']:,} of the {stats['codes']:,} codes the model read "
                                      f"({share:.0%}) are not in the vocabulary of the bundle ({bundle.path}): the visits "
                                      "use other codes than it was trained on (e.g. MIMIC-IV codes, ICD9_/ICD10_ "
                                      "prefixed, for a MIMIC-III bundle); nothing was written",
                                fix="score them with a bundle trained on this vocabulary, or map the codes to it; "
                                    "--allow-unknown writes the recommendations anyway")
            if target is None:
                with open(tmp, "rb") as f:
                    shutil.copyfileobj(f, sys.stdout.buffer)
                sys.stdout.buffer.flush()
                os.unlink(tmp)
            else:
                try:
                    os.replace(tmp, target)
                except OSError as e:
                    raise _write_error(e, target, directory) from None
        except BaseException:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise
    return stats


def _stream(bundle: Bundle, stream, name: str, put, stats: dict, *, fmt: str, all_visits: bool, top_k: int | None,
            threshold: float | None, batch_size: int) -> None:
    """Read, score and `put` the formatted chunks, counting into `stats`."""
    from concurrent.futures import ThreadPoolExecutor

    if fmt == "csv":
        put(",".join(OUTPUT_COLUMNS).encode() + b"\n")  # no column name needs quoting
    plain = plain_codes(bundle.med_codes)

    def emit(scored: Scored, n_patients: int) -> None:
        if fmt == "csv":
            put(csv_chunk(bundle, scored, plain_codes=plain, threshold=threshold, top_k=top_k))
        else:
            rows = format_rows(bundle, scored, fmt=fmt, threshold=threshold, top_k=top_k)
            put("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows).encode())
        over = scored.over_limit if scored.over_limit is not None else np.zeros_like(scored.unknown)
        unknown = scored.unknown - over
        stats["patients"] += n_patients
        stats["visits"] += len(scored.visit_ids)
        stats["codes"] += int(scored.codes.sum()) if scored.codes is not None else 0
        stats["unknown_codes"] += int(unknown.sum())
        stats["visits_with_unknown"] += int((unknown > 0).sum())
        stats["codes_over_limit"] += int(over.sum())
        stats["visits_over_limit"] += int((over > 0).sum())

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


# ---------------------------------------------------------------------------------------------
# The output file: never the input, never left half-written


class Interrupted(SystemExit):
    """SIGTERM or SIGINT during `predict_file`: raised in the main thread so that the temp file is
    removed on the way out. Exits 128 + the signal number (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


@contextlib.contextmanager
def _signals_raise():
    """While the block runs, SIGTERM and SIGINT raise `Interrupted` (the default SIGTERM action ends
    the process at once, leaving the temp file). Only the main thread can take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupted(signum, frame):
        raise Interrupted(signum)

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in before:
        signal.signal(s, interrupted)
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _check_output(target: Path, input_path: str, bundle_dir: Path) -> None:
    """Refuse an output path that is the input file, lies in the bundle or is a directory."""
    if input_path != "-" and (target.resolve() == Path(input_path).resolve()
                              or target.exists() and Path(input_path).exists() and os.path.samefile(target, input_path)):
        raise DataError(target, f"is the --input file ({input_path}): writing the recommendations there would "
                                "replace the visits; nothing was written", fix="pass another --output path")
    inside = target.resolve()
    if bundle_dir.resolve() in (inside, *inside.parents):
        raise DataError(target, f"is inside the bundle directory {bundle_dir}; a bundle holds only its own files",
                        fix="write the recommendations outside the bundle")
    if target.is_dir():
        raise DataError(target, "is a directory", fix="pass a file path as --output, e.g. recs.csv")


def _temp_tag() -> str:
    """`leader-edge.HOST.PID.`: whose temp file it is (see `_remove_stale_temps`)."""
    return f"leader-edge.{socket.gethostname().replace('/', '_')}.{os.getpid()}."


def _remove_stale_temps(directory: Path, stem: str) -> None:
    """Remove this host's temp files for `stem` whose process is gone (a run killed outright)."""
    prefix, host = f".{stem}.leader-edge.", socket.gethostname().replace("/", "_")
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for entry in names:
        if not (entry.startswith(prefix) and entry.endswith(".tmp")):
            continue
        parts = entry[len(prefix):].rsplit(".", 3)  # HOST, PID, random, "tmp"
        if len(parts) != 4 or parts[0] != host or not parts[1].isdigit() or _alive(int(parts[1])):
            continue
        try:
            os.unlink(directory / entry)
            log.warning("removed %s, left by an earlier run that was killed (process %s)", directory / entry, parts[1])
        except OSError:
            pass  # another run removed it first, or no permission: it is ignored either way


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _output_mode(target: Path) -> int:
    """Permission bits for the output: the replaced file's, or what the umask gives a new file."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        umask = os.umask(0o022)  # the only way to read it; set back at once
        os.umask(umask)
        return 0o666 & ~umask


def _write_error(e: OSError, target: Path | None, directory: Path) -> DataError:
    """A failed write or rename of the output, naming it (the temp file is removed by the caller)."""
    what = f"{e.strerror or e}" + (f" ({errno.errorcode.get(e.errno, e.errno)})" if e.errno else "")
    full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    if target is None:
        fix = "free space there, or set TMPDIR to a directory on a disk with space" if full else \
            "set TMPDIR to a writable directory"
        return DataError(directory, f"cannot hold the recommendations before they go to standard output: {what}; "
                                    "nothing was written", fix=fix)
    fix = f"free space on the disk that holds {directory}, or pass an --output on another disk" if full else \
        f"check that {directory} is writable, or pass another --output"
    return DataError(target, f"cannot be written: {what}; nothing was written (the temp file in {directory} is removed)",
                     fix=fix)
