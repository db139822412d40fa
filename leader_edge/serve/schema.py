"""The JSON request of `POST /v1/recommend`: the canonical visit fields, as a pydantic schema.

The schema checks the JSON's shape (types, required fields, sizes, one code per string); what a
visit means (ids, ISO times in order, unique visit ids, ids a spreadsheet would not run) is checked
by the core's visits reader, the one that `predict` uses (`serve.model`). Every refusal names the
field as a path into the request, e.g. `patients[0].visits[1].visit_time`.

    {"patients": [{"patient_id": "p1", "visits": [
        {"visit_id": "v1", "visit_time": "2100-01-01T08:00:00", "diagnoses": ["4019", "25000"],
         "procedures": ["3893"], "medications": [], "profile": {"insurance": "Medicare"}}]}],
     "top_k": null, "threshold": null, "explain": false}

`{"patient": {...}}` is the same for one patient.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError, model_validator

# A code is one token of a visits file's `a;b;c` list: no whitespace, ',' or ';' (a ';' inside one
# string would silently become two codes). 64 characters: ICD-10-PCS codes are 7, ATC 7, RXCUI <= 8.
Code = Annotated[str, Field(pattern=r"^[^\s,;]+$", max_length=64)]
# Ids and values travel into CSV-shaped records and logs: no control characters (a newline would
# split a record). 256 characters is far beyond any hospital id.
Text = Annotated[str, Field(pattern=r"^[^\x00-\x1f\x7f]*$", max_length=256)]
ProfileField = Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+$", max_length=64)]
# Per visit and kind: MIMIC-III lists at most 39 diagnoses per admission; the model reads the first
# `encoder.max_codes` (32). 512 leaves room for any real record and bounds the work per request.
MAX_CODES = 512
# The model reads the last `encoder.max_visits` (8) visits; older ones only cost time.
MAX_VISITS = 256
# `explain: true` bounds. An explanation reads the explain graph's [L, M] shares per patient (96 x 135
# floats for a MIMIC bundle) and lists up to ~96 driver codes per medication, so threshold 0 over
# 256 patients would be 256 x 135 lists of up to 96 dicts (~3 M dicts). 20 medications is above the
# ~15 a MIMIC-III visit is prescribed on average; 32 patients keeps one request's explaining below
# one explain-graph run (256 rows).
MAX_EXPLAIN_PATIENTS = 32
MAX_EXPLAINED = 20  # medications explained per patient


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is named, not ignored


class VisitIn(_Strict):
    """One visit; the last visit of a patient is the one recommended for (its medications are not read)."""

    visit_id: Text
    visit_time: Text = Field(description="ISO 8601 date or date-time; a patient's visits oldest first")
    diagnoses: list[Code] = Field(default_factory=list, max_length=MAX_CODES)
    procedures: list[Code] = Field(default_factory=list, max_length=MAX_CODES)
    medications: list[Code] = Field(default_factory=list, max_length=MAX_CODES)
    profile: dict[ProfileField, Text] = Field(default_factory=dict, max_length=32,
                                              description="profile fields of the bundle (e.g. insurance)")


class PatientIn(_Strict):
    patient_id: Text
    visits: list[VisitIn] = Field(min_length=1, max_length=MAX_VISITS)


# top_k recommends the k most probable whatever the threshold: both at once silently ignored one
EXCLUSIVE = ("give top_k or threshold, not both: top_k recommends the k most probable medications whatever "
             "their probability, threshold every medication at or above it")


class RecommendRequest(_Strict):
    """One patient (`patient`) or a batch (`patients`), and how to decide the recommended set."""

    patient: PatientIn | None = None
    patients: list[PatientIn] | None = Field(default=None, min_length=1)
    # Strict: `true` is not 1, "5" is not 5 (lax parsing turned "threshold": true into 1.0, no medication)
    top_k: StrictInt | None = Field(default=None, ge=1, le=10_000,
                              description="recommend the k most probable medications instead of thresholding")
    threshold: StrictFloat | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False,
                                    description="decision threshold; default: the bundle's, tuned on validation")
    all_scores: StrictBool = Field(default=False, description="every medication's probability, not only the recommended")
    explain: StrictBool = Field(default=False, description="per recommended medication, the input codes that drove it; "
                          f"at most {MAX_EXPLAIN_PATIENTS} patients and {MAX_EXPLAINED} medications per patient "
                          "(top_k, or the threshold's set), else 422")

    @model_validator(mode="after")
    def _one_form(self) -> "RecommendRequest":
        if (self.patient is None) == (self.patients is None):
            raise ValueError("give either 'patient' (one) or 'patients' (a batch), not both or neither")
        if self.top_k is not None and self.threshold is not None:
            raise ValueError(EXCLUSIVE)
        return self

    def patient_list(self) -> list[PatientIn]:
        return [self.patient] if self.patient is not None else list(self.patients)


def field_path(loc: tuple) -> str:
    """`("patients", 0, "visits", 1, "visit_time")` -> `patients[0].visits[1].visit_time`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def schema_errors(error: ValidationError) -> list[dict]:
    """pydantic's errors as `{"field", "message"}`, the field as `field_path` writes it."""
    out = []
    for e in error.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if p not in ("function-after[_one_form()]",))
        out.append({"field": field_path(loc), "message": e["msg"]})
    return out


def request_schema() -> dict:
    """The JSON schema of the request body (also in the OpenAPI description)."""
    return RecommendRequest.model_json_schema(ref_template="#/components/schemas/{model}")
