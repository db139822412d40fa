"""The bedside runtime: a bundle loaded, proven and scored. No torch.

Imports only onnxruntime, numpy, the standard library and torch-free leader_edge modules
(`encoding`, `visit_stream`, `visit_table`, `recs`, `errors`), so `leader-edge predict` starts in ~0.3 s.
Streaming a visits file through a bundle into an output file is `leader_edge.bedside.predict_file`, which
imports this module (never the reverse).

    bundle = Bundle.load("bundle/")                      # proves the bundle (below) or refuses it
    for chunk in read_patients(open("visits.csv", "rb"), "visits.csv"):   # visit_stream: VisitTable chunks
        result = bundle.predict(chunk)                   # one row per predicted visit

In memory (a service): `Bundle.recommend` takes patients as lists of visit records (dicts or objects
with patient_id, visit_id, visit_time, diagnoses, procedures, medications, profile), checks them
with the reader's own contract (`visit_records.read_records`: errors at the line each record would
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

Steps 1-4 are `leader_edge.bedside.manifest`; 5-6 and the
scoring are this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from leader_edge.bedside.encoding import INPUT_NAMES, EncodedVisits, Encoder, RawVisit
from leader_edge.errors import DataError
from leader_edge.bedside.manifest import MANIFEST, REEXPORT, SELFTEST_ATOL, field_error, read_manifest, verify_signature
from leader_edge.bedside.recs import Scored, json_records
from leader_edge.bedside.visit_records import read_records
from leader_edge.bedside.visit_table import VisitTable

VISIT_SLOTS = 2048  # padded visit slots per model call (see Bundle._score)
# ONNX metadata keys stamped by the export: the sizes of the model's own tables.
MODEL_SIZES = ("n_codes", "n_meds", "n_profile_ids", "max_visits")
METADATA_PREFIX = "leader_edge."


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

    def __init__(self, path: Path, manifest: dict, session, workers: int = 1) -> None:
        self.path, self.manifest, self.session = path, manifest, session
        self.workers = max(1, workers)  # batches scored at once (`_score`), one onnxruntime thread each
        self._pool = None
        self.encoder = Encoder.from_json(manifest["encoder"])
        self.threshold = float(manifest["threshold"])
        self.med_codes: list[str] = list(self.encoder.codes["medication"])
        index = {c: j for j, c in enumerate(self.med_codes)}
        pairs = [(index[a], index[b]) for a, b in manifest.get("ddi_pairs", [])]  # read_manifest checked them
        self.ddi = np.array(pairs, dtype=np.int64).reshape(-1, 2)

    @classmethod
    def load(cls, path: str | Path, *, threads: int = 0, trust: str | Path | None = None,
             split: str = "batches") -> "Bundle":
        """Open a bundle that proves itself (see the module docstring), or refuse it.

        Args:
            path: the bundle directory written by `leader-edge export`.
            threads: threads that score (0: one per CPU this process may use).
            split: how they share the work. "batches": each scores whole batches with a one-thread
                onnxruntime session - on 2 cores beside the CSV reader and writer, 12-15% faster
                end to end than splitting operators (`predict`, 100k patients, 2026-12-02); a call
                of one batch runs on one thread. "operators": one batch at a time, each operator
                on `threads` onnxruntime threads (`serve`: a request is one batch). Either way
                the batches, so the probabilities, do not depend on the thread count.
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
        if split not in ("batches", "operators"):
            raise ValueError(f"split={split!r}; use 'batches' or 'operators'")
        if split == "operators":
            bundle = cls(d, manifest, open_session(model, threads), workers=1)
        else:
            bundle = cls(d, manifest, open_session(model, threads=1), workers=threads or _usable_cpus())
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
                    raise field_error(self.path / MANIFEST, "encoder.max_visits", f"is {self.encoder.max_visits}, more "
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

    def predict(self, chunk: VisitTable, *, all_visits: bool = False, batch_size: int = 1024,
                encoded: EncodedVisits | None = None) -> Scored:
        """Score each patient's last visit of a reader's chunk, or every visit (`all_visits`, each
        with its own history). `encoded`: the chunk's `encoder.encode_table`, when the caller has
        it already (`predict_file` encodes on its reading thread)."""
        visits = self.encoder.encode_table(chunk) if encoded is None else encoded
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
        patients x 8 visits made it grow to ~800 MB. Rows come back in `ends` order. With
        `workers` > 1 the batches run side by side; which patients share a batch depends on the
        data and `batch_size` only, never on the thread count, so neither do the probabilities
        (the graph is batch-invariant only to ~3e-7, enough to move a 4-decimal score).

        Returns:
            (float32 [N, M] probabilities, int64 [N] unknown-code counts).
        """
        order = visits.size_order(ends)
        n = len(order)
        prob = np.empty((n, len(self.med_codes)), dtype=np.float32)
        unknown = np.empty(n, dtype=np.int64)
        widths = visits.kept(ends)[order].tolist()
        start, jobs = 0, []
        while start < n:
            width = widths[min(start + batch_size, n) - 1]  # sorted: the last is the widest
            size = max(1, min(batch_size, VISIT_SLOTS // width))
            idx = order[start : start + size]
            batch = visits.batch(ends[idx])
            unknown[idx] = batch.unknown
            jobs.append((idx, batch.inputs()))
            start += size
        if self.workers > 1 and len(jobs) > 1:  # onnxruntime releases the GIL: batches run side by side
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="leader-edge-score")
            outputs = self._pool.map(lambda job: self.session.run(None, job[1])[0], jobs)
        else:
            outputs = (self.session.run(None, inputs)[0] for _, inputs in jobs)
        for (idx, _), out in zip(jobs, outputs):
            prob[idx] = out
        return prob, unknown

    def recommend(self, patients, *, all_visits: bool = False, threshold: float | None = None,
                  top_k: int | None = None, source: str = "request") -> list[dict]:
        """The in-memory scoring API: what `predict --format jsonl` writes for these patients.

        Args:
            patients: lists of visit records (see `visit_records.read_records`), one list per patient,
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


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


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


def _installed(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"

