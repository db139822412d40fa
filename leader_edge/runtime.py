"""The bedside runtime: a bundle loaded, proven and scored. No torch.

Imports only onnxruntime, numpy, the standard library and torch-free leader_edge modules
(`encoding`, `visit_stream`, `visit_table`, `recs`, `errors`), so `leader-edge predict` starts in ~0.3 s.
Streaming a visits file through a bundle into an output file is `leader_edge.predict_file`, which
imports this module (never the reverse).

    bundle = Bundle.load("bundle/")                      # proves the bundle (below) or refuses it
    for chunk in read_patients(open("visits.csv", "rb"), "visits.csv"):   # visit_stream: VisitTable chunks
        result = bundle.predict(chunk)                   # one row per predicted visit

In memory (a service): `Bundle.recommend` takes patients as lists of visit records (dicts or objects
with patient_id, visit_id, visit_time, diagnoses, procedures, medications, profile), checks them
with the reader's own contract (`visit_stream.read_records`: errors at the line each record would
have in a visits file), encodes and scores them as `predict` does and returns what
`predict --format jsonl` writes, one dict per visit:

    bundle.recommend([[{"patient_id": "p1", "visit_id": "v1", "visit_time": "2100-01-01",
                        "diagnoses": ["4019"], "procedures": [], "medications": [],
                        "profile": {"insurance": "Medicare"}}]], top_k=10)
    -> [{"patient_id": "p1", "visit_id": "v1", "medications": [...], "scores": {code: prob},
         "ddi_warnings": [[a, b], ...], "unknown_codes": 0}]

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

At ~540 lines this file is past the house ~400: the seam left inside it, the manifest proof
(steps 1-4: `read_manifest`, its `_check_*`, `verify_signature`, the digest helpers; ~220 lines),
would move names that export/bundle.py imports from here, so it waits for a change that updates
that file too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path

import numpy as np

from leader_edge.encoding import INPUT_NAMES, EncodedVisits, Encoder, RawVisit
from leader_edge.errors import DataError
from leader_edge.recs import Scored, json_records
from leader_edge.visit_stream import read_records
from leader_edge.visit_table import VisitTable

BUNDLE_FORMAT = 2  # 2: digest over every field and file, self-test, vocabulary sizes in the model
MANIFEST = "manifest.json"
MODEL = "model.onnx"
SELFTEST = "selftest.json"
SIGNATURE = "signature.json"  # beside the listed files: it signs the digest, so it cannot be in it
VISIT_SLOTS = 2048  # padded visit slots per model call (see Bundle._score)
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
        """Probabilities for each patient's last visit, the visits taken as given (no reader checks:
        the self-test's and the export's own patients; a user's visits go through `predict`).

        Returns:
            (float32 [N, M] probabilities, int64 [N] unknown-code counts), rows in input order.
        """
        visits = self.encoder.encode_visits(patients)
        return self._score(visits, visits.last_rows(), batch_size)

    def predict(self, chunk: VisitTable, *, all_visits: bool = False, batch_size: int = 1024) -> Scored:
        """Score each patient's last visit of a reader's chunk, or every visit (`all_visits`, each
        with its own history)."""
        visits = self.encoder.encode_table(chunk)
        if all_visits:
            ends = np.arange(len(chunk.visit_ids))
            pids, vids = chunk.row_patients(), list(chunk.visit_ids)
        else:
            ends = chunk.starts[1:] - 1
            pids, vids = list(chunk.patient_ids), [chunk.visit_ids[e] for e in ends.tolist()]
        prob, unknown = self._score(visits, ends, batch_size)
        written, over = visits.read_counts(ends)
        return Scored(pids, vids, prob, unknown + over, over, written)

    def _score(self, visits: EncodedVisits, ends: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Run the model over the targets whose current visits are rows `ends`, sorted by size so
        that a batch pads to similar lengths; a batch holds at most `batch_size` targets and
        `VISIT_SLOTS` padded visit slots (B x K), which bounds onnxruntime's memory arena: 1024
        patients x 8 visits made it grow to ~800 MB. Rows come back in `ends` order.

        Returns:
            (float32 [N, M] probabilities, int64 [N] unknown-code counts).
        """
        order = visits.size_order(ends)
        n = len(order)
        prob = np.empty((n, len(self.med_codes)), dtype=np.float32)
        unknown = np.empty(n, dtype=np.int64)
        widths = visits.kept(ends)[order].tolist()
        start = 0
        while start < n:
            width = widths[min(start + batch_size, n) - 1]  # sorted: the last is the widest
            size = max(1, min(batch_size, VISIT_SLOTS // width))
            idx = order[start : start + size]
            batch = visits.batch(ends[idx])
            prob[idx] = self.session.run(None, batch.inputs())[0]
            unknown[idx] = batch.unknown
            start += size
        return prob, unknown

    def recommend(self, patients, *, all_visits: bool = False, threshold: float | None = None,
                  top_k: int | None = None, source: str = "request") -> list[dict]:
        """The in-memory scoring API: what `predict --format jsonl` writes for these patients.

        Args:
            patients: lists of visit records (see `visit_stream.read_records`), one list per patient,
                oldest visit first; checked by the same reader contract as a visits file.
            all_visits: one record per visit (each with the visits before it), not per patient.
            threshold, top_k: the recommended set (default: the bundle's threshold).
            source: the name errors give instead of a file name.

        Returns:
            One dict per scored visit, in input order: patient_id, visit_id, medications (the
            recommended codes, most probable first), scores ({code: probability at 4 decimals} for
            every code that rounds above 0, most probable first), ddi_warnings ([[a, b], ...] pairs
            inside the recommendation), unknown_codes (codes the model did not read).

        Raises:
            DataError: a record the reader refuses, located at the line it would have in a visits file.
        """
        scored = self.predict(read_records(patients, source), all_visits=all_visits)
        return list(json_records(self.med_codes, scored, threshold=self.threshold if threshold is None else threshold,
                                 top_k=top_k, ddi=self.ddi))


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

