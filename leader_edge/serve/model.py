"""The service's one door into the core: load a bundle, check and score request patients, format them.

Every call into the core's reading, encoding, scoring and formatting API is in this module, so the
service follows the core when it changes. It is `Bundle.recommend` taken apart: each request's
patients go through the visits reader's contract on their own (`visit_records.read_records`: one
validator for files and requests, whose errors name the line a record would have in a file, mapped
back here to the request field), so one bad request fails alone; the tables of all requests queued
meanwhile are scored in ONE `Bundle.predict` call (one onnxruntime run for 32 concurrent patients
instead of 32), and each request's rows are formatted with its own options by
`recs.json_records`: a patient gets what `predict --format jsonl` writes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leader_edge.data.dataset import PROFILE_PREFIX
from leader_edge.errors import DataError
from leader_edge.bedside.explain import Explainer
from leader_edge.bedside.recs import Scored, json_records
from leader_edge.bedside.runtime import Bundle
from leader_edge.serve.schema import MAX_EXPLAIN_PATIENTS, MAX_EXPLAINED, PatientIn
from leader_edge.bedside.visit_records import read_records
from leader_edge.bedside.visit_table import VisitTable

_LINE = re.compile(r"\b(on )?line (\d+)\b")  # a line of the in-memory CSV, named in a reader's message
REQUEST = "request"  # the "file name" the reader sees; errors are re-addressed to request fields
_KINDS = (("diagnosis", "diagnoses"), ("procedure", "procedures"), ("medication", "medications"))


class RequestError(ValueError):
    """A request the service refuses, naming the field (`patients[0].visits[1].visit_time`)."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


@dataclass
class Model:
    """A proven bundle ready to score request patients. Immutable once built: a swap builds a new one."""

    bundle: Bundle
    path: Path

    def __post_init__(self) -> None:
        self.vocab = {k: frozenset(self.bundle.encoder.codes[k]) for k, _ in _KINDS}
        self.explainer = Explainer(self.bundle) if Explainer.available(self.bundle) else None

    @classmethod
    def load(cls, path: str | Path, *, trust: str | Path | None = None, threads: int = 1) -> "Model":
        """Load and prove a bundle (`Bundle.load`: digest, meaning, self-test). Raises `DataError`.

        threads: onnxruntime intra-op threads per call (a request is one batch: `Bundle.load`'s
        split="operators"). 1: a single patient is ~0.1 ms of model time, so the service runs
        many calls at once rather than one call on many cores."""
        return cls(Bundle.load(path, threads=threads, trust=trust, split="operators"), Path(path))

    @property
    def id(self) -> str:
        """The bundle's identity: the first 16 hex digits of its manifest digest (covers every file)."""
        return self.bundle.manifest["digest"]["sha256"][:16]

    @property
    def codes(self) -> dict[str, list[str]]:
        """kind -> the bundle's codes (vocabulary order)."""
        return self.bundle.encoder.codes

    @property
    def profile_fields(self) -> list[str]:
        return self.bundle.encoder.profile_fields

    def describe(self) -> dict:
        return {"id": self.id, "threshold": self.bundle.threshold, "variant": self.bundle.manifest["model"]["variant"],
                "medications": len(self.bundle.med_codes), "profile_fields": self.bundle.encoder.profile_fields}

    def recommend(self, patients: list[PatientIn], **options) -> list[dict]:
        """`score` for one job; raises its `RequestError`."""
        (result,) = self.score([Job(patients, **options)])
        if isinstance(result, RequestError):
            raise result
        return result

    def score(self, jobs: list["Job"]) -> list[list[dict] | RequestError]:
        """Score several requests' patients in one model call (each request read and checked on its
        own, so one bad request fails alone). Per patient, for its last visit: the
        `predict --format jsonl` fields (`medications` most probable first, `scores`, `ddi_warnings`,
        `unknown_codes`) and `unknown`: the codes outside the bundle's vocabulary by kind, in the
        visits the model reads, and profile fields the bundle does not have.

        Returns:
            Per job, its records in patient order, or the `RequestError` naming its bad field.
        """
        errors, table = self._read_jobs(jobs)
        if table is None:
            return errors
        scored = self.bundle.predict(table)
        # Format runs of consecutive requests with the same options in one pass (each pass has a
        # fixed cost: 32 single-patient requests formatted one by one cost ~2x one pass over 32).
        sizes = [len(job.patients) if error is None else 0 for job, error in zip(jobs, errors)]
        formatted: list[dict] = []
        runs, start = [], 0
        for job, size in zip(jobs, sizes):
            key = (job.threshold, job.top_k)
            if size and runs and runs[-1][0] == key:
                runs[-1][2] += size
            elif size:
                runs.append([key, start, start + size])
            start += size
        for (threshold, top_k), a, b in runs:
            part = Scored(scored.patient_ids[a:b], scored.visit_ids[a:b], scored.y_prob[a:b], scored.unknown[a:b])
            formatted += json_records(self.bundle.med_codes, part, top_k=top_k, ddi=self.bundle.ddi,
                                      threshold=self.bundle.threshold if threshold is None else threshold)
        out, start, explaining = [], 0, []
        for job, error, size in zip(jobs, errors, sizes):
            if error is not None:
                out.append(error)
                continue
            records = formatted[start:start + size]
            for record, patient in zip(records, job.patients):
                if not job.all_scores:
                    record["scores"] = {c: record["scores"].get(c, 0.0) for c in record["medications"]}
                record["unknown"] = self._unknown(patient)
            if job.explain:
                crowded = next((i for i, r in enumerate(records) if len(r["medications"]) > MAX_EXPLAINED), None)
                if crowded is not None:
                    out.append(RequestError(
                        "threshold", f"patients[{crowded}] gets {len(records[crowded]['medications'])} medications at "
                                     f"threshold {job.threshold if job.threshold is not None else self.bundle.threshold}; "
                                     f"explain explains at most {MAX_EXPLAINED} per patient: raise the threshold or "
                                     f"set top_k <= {MAX_EXPLAINED}"))
                    start += size
                    continue
                explaining.append((records, table.starts[start + 1:start + size + 1] - 1))  # its current visits
            out.append(records)
            start += size
        if explaining:  # one encoding and explain-graph pass for every explaining request of the batch
            records = [r for rs, _ in explaining for r in rs]
            why = self.explainer.explain_table(table, np.concatenate([ends for _, ends in explaining]),
                                               [r["medications"] for r in records])
            for record, explanation in zip(records, why):
                record["explanations"] = explanation
        return out

    def _read_jobs(self, jobs: list["Job"]) -> tuple[list[RequestError | None], VisitTable | None]:
        """Per job its `RequestError` or None, and one table of the good jobs' patients (None: none).

        All jobs are read in one `read_records` call first: 0.04-0.08 ms per single-patient request
        against 0.19-0.25 ms read one by one (32 demo patients). Every check of a row or a patient
        is the same either way and the merged read adds only cross-request ones (two requests
        naming one patient or one visit id), so when it passes every job passes; when it fails,
        each job is read on its own to find which are bad."""
        errors: list[RequestError | None] = [None] * len(jobs)
        for k, job in enumerate(jobs):
            if job.explain and self.explainer is None:
                errors[k] = RequestError("explain", f"bundle {self.id} carries no explanation graph (explain.onnx); "
                                                    "export it again with this leader-edge to explain its recommendations")
            elif job.explain and len(job.patients) > MAX_EXPLAIN_PATIENTS:
                errors[k] = RequestError("patients", f"{len(job.patients)} patients with explain; the limit is "
                                                     f"{MAX_EXPLAIN_PATIENTS} per request: split the batch")
            elif job.explain and job.top_k is not None and job.top_k > MAX_EXPLAINED:
                errors[k] = RequestError("top_k", f"{job.top_k} with explain; at most {MAX_EXPLAINED} medications "
                                                  "per patient are explained")
        good = [job for job, error in zip(jobs, errors) if error is None]
        if len(good) > 1:
            try:
                return errors, self._read([p for job in good for p in job.patients])
            except RequestError:
                pass
        tables = []
        for k, job in enumerate(jobs):
            if errors[k] is None:
                try:
                    tables.append(self._read(job.patients))
                except RequestError as e:
                    errors[k] = e
        return errors, _concat(tables) if tables else None

    def _read(self, patients: list[PatientIn]) -> VisitTable:
        """The patients through the core's visits-reader contract (`read_records`), or a `RequestError`."""
        fields = set(self.bundle.encoder.profile_fields)  # others are not read (listed in `unknown`)
        records, where = [], []  # where[line - 2]: (patient, visit) of the record on that line
        for i, p in enumerate(patients):
            # Code lists as the file's `a;b;c` text: the schema already holds each code to one token
            # without ';', and read_records then checks the text as it checks a file's (~30% faster
            # than per-code type checks of lists).
            records.append([{"patient_id": p.patient_id, "visit_id": v.visit_id, "visit_time": v.visit_time,
                             "diagnoses": ";".join(v.diagnoses), "procedures": ";".join(v.procedures),
                             "medications": ";".join(v.medications),
                             "profile": {f: x for f, x in v.profile.items() if f in fields}} for v in p.visits])
            where += [(i, j) for j in range(len(p.visits))]
        try:
            return read_records(records, REQUEST)
        except DataError as e:
            raise _request_error(e, where) from None

    def _unknown(self, patient: PatientIn) -> dict:
        """What of the patient the model does not read: {kind: codes outside the vocabulary},
        "over_limit" {kind: known codes beyond `max_codes` in one visit (the first ones written are
        read)}, "profile" [fields the bundle lacks], "profile_values" {field: a value it never saw},
        "older_visits" (how many visits lie before the `max_visits` it reads). Keys only when non-empty.
        Before, the over-limit codes were only counted in `unknown_codes`, and unseen profile values
        and older visits went unsaid."""
        encoder, vocab = self.bundle.encoder, self.vocab
        kept = patient.visits[-encoder.max_visits:]
        out, over = {}, {}
        for kind, name in _KINDS:
            visits = kept[:-1] if kind == "medication" else kept  # the current visit's medications are never read
            codes = [c for v in visits for c in getattr(v, name) if c not in vocab[kind]]
            if codes:
                out[name] = list(dict.fromkeys(codes))
            for v in visits:
                known = list(dict.fromkeys(c for c in getattr(v, name) if c in vocab[kind]))
                if len(known) > encoder.max_codes:
                    over.setdefault(name, []).extend(known[encoder.max_codes:])
        if over:
            out["over_limit"] = over
        values = encoder.profile_values
        current = patient.visits[-1].profile
        extra = [f for f in current if f not in values]
        if extra:
            out["profile"] = extra  # fields this bundle was not trained with: not read
        unseen = {f: x for f, x in current.items() if f in values and x and x not in values[f]}
        if unseen:
            out["profile_values"] = unseen  # read as the field's "unknown" value
        if len(patient.visits) > len(kept):
            out["older_visits"] = len(patient.visits) - len(kept)
        return out


@dataclass
class Job:
    """One request's patients and its decision options (see `schema.RecommendRequest`)."""

    patients: list[PatientIn]
    threshold: float | None = None
    top_k: int | None = None
    all_scores: bool = False
    explain: bool = False
    # A request mapped to patients with a bundle's vocabulary (FHIR: code forms, profile fields):
    # `remap(model)` maps it again for `model` and sets `patients` and `mapped_for`, or raises RequestError.
    remap: Callable[["Model"], None] | None = None
    mapped_for: "Model | None" = None


def _concat(tables: list[VisitTable]) -> VisitTable:
    """Requests' tables as one; a profile field one request lacks reads as "" (as a file without the column)."""
    if len(tables) == 1:
        return tables[0]
    fields = list(dict.fromkeys(f for t in tables for f in t.profile))
    offsets = np.cumsum([0, *(len(t.visit_ids) for t in tables)])
    starts = np.concatenate([tables[0].starts[:1], *(t.starts[1:] + o for t, o in zip(tables, offsets))])
    return VisitTable([p for t in tables for p in t.patient_ids], starts, [v for t in tables for v in t.visit_ids],
                      np.concatenate([t.lines for t in tables]),
                      {c: [x for t in tables for x in t.codes[c]] for c in tables[0].codes},
                      {f: [x for t in tables for x in t.profile.get(f, [""] * len(t.visit_ids))] for f in fields},
                      None if any(t.times is None for t in tables) else [x for t in tables for x in t.times])


def _request_error(e: DataError, where: list[tuple[int, int]]) -> RequestError:
    """A reader error at (line, column) of the in-memory CSV -> the request field it came from; a line
    its message names ("earlier than the patient's previous visit on line 2") -> the visit's path."""

    def visit_path(m: re.Match) -> str:
        line = int(m.group(2))
        if not 2 <= line < len(where) + 2:
            return m.group(0)
        i, j = where[line - 2]
        return f"{'at ' if m.group(1) else ''}patients[{i}].visits[{j}]"

    message = _LINE.sub(visit_path, e.message + (f"; fix: {e.fix}" if e.fix else ""))
    if e.line is None or not 2 <= e.line < len(where) + 2:
        return RequestError("patients", message)
    i, j = where[e.line - 2]
    column = e.column if isinstance(e.column, str) else None
    if column == "patient_id":
        return RequestError(f"patients[{i}].patient_id", message)
    if column is None:
        return RequestError(f"patients[{i}].visits[{j}]", message)
    if column.startswith(PROFILE_PREFIX):
        column = f"profile.{column[len(PROFILE_PREFIX):]}"
    return RequestError(f"patients[{i}].visits[{j}].{column}", message)
