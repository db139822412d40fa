"""A FHIR R4 `Bundle` -> request patients (`serve.schema.PatientIn`), and everything it did not use.

    patients, report = to_patients(bundle_json, encoder_codes)

- `Patient` -> a patient (`id`); `Encounter` -> a visit (`id`, `period.start` as the visit time,
  `subject`); a patient's visits are sorted by time and the last is the one recommended for.
- `Condition` -> diagnoses, `Procedure` -> procedures, `MedicationRequest` -> medications of the
  visit named by its `encounter` reference (or the patient's only encounter, noted in the report).
  `medicationCodeableConcept`, or `medicationReference` to a `Medication` in the Bundle.
- Codings by system URI: ICD-9-CM (`http://hl7.org/fhir/sid/icd-9-cm`) and ICD-10(-CM)
  (`http://hl7.org/fhir/sid/icd-10-cm`, `http://hl7.org/fhir/sid/icd-10`) for conditions, ICD-9-CM
  and ICD-10-PCS (`http://www.cms.gov/Medicare/Coding/ICD10`) for procedures, ATC
  (`http://www.whocc.no/atc`) and RxNorm (`http://www.nlm.nih.gov/research/umls/rxnorm`) for
  medications. A code is written the way the bundle's vocabulary writes it: undotted (401.9 ->
  4019), `ICD9_`/`ICD10_`-prefixed for a MIMIC-IV bundle, an ATC code cut to the vocabulary's level
  (C07AB02 -> C07A for ATC-3 classes). A bundle over ATC classes cannot read an RxNorm code (no map
  travels with it): such a coding is reported, as is every coding of a system not listed above.
- `Patient.maritalStatus` -> the profile field `marital_status` when the bundle has one.

Nothing is dropped silently: `report["unused"]` lists every resource not used and why,
`report["codings"]` every coding not used (unknown system, another coding of the same resource
chosen, no map), `report["notes"]` assumptions made (a resource without an encounter reference).
"""

from __future__ import annotations

from datetime import datetime

from pydantic import ValidationError

from leader_edge.serve.schema import RecommendRequest, schema_errors

ICD9 = "http://hl7.org/fhir/sid/icd-9-cm"
ICD10 = ("http://hl7.org/fhir/sid/icd-10-cm", "http://hl7.org/fhir/sid/icd-10")
ICD10_PCS = "http://www.cms.gov/Medicare/Coding/ICD10"
ATC = "http://www.whocc.no/atc"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
# resource type -> (visit field, vocabulary kind, {system: ICD version or code family}), systems in preference order
USES = {
    "Condition": ("diagnoses", "diagnosis", {ICD9: "9", **{s: "10" for s in ICD10}}),
    "Procedure": ("procedures", "procedure", {ICD9: "9", ICD10_PCS: "10"}),
    "MedicationRequest": ("medications", "medication", {ATC: "atc", RXNORM: "rxnorm"}),
}
UNUSABLE_STATUS = {"entered-in-error", "refuted"}  # a statement withdrawn by its author
# HL7 v3 MaritalStatus -> the MIMIC values a bundle's `marital_status` field was trained on
MARITAL = {"D": "DIVORCED", "L": "SEPARATED", "M": "MARRIED", "S": "SINGLE", "W": "WIDOWED", "UNK": "UNKNOWN (DEFAULT)"}
QUERY_OPTIONS = {"top_k": int, "threshold": float, "all_scores": bool, "explain": bool}


class FHIRError(ValueError):
    """A Bundle that cannot be mapped at all, naming the FHIR field (`entry[3].resource.period.start`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def options(query) -> dict:
    """`?top_k=5&threshold=0.3&all_scores=true&explain=true` -> Job options (names the bad parameter)."""
    out = {}
    for name, kind in QUERY_OPTIONS.items():
        text = query.get(name)
        if text is None:
            continue
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[name] = text.lower() in ("true", "1")
            else:
                out[name] = kind(text)
        except ValueError:
            raise FHIRError(name, f"{text!r} is not a{'n integer' if kind is int else ' number' if kind is float else ' boolean'}") from None
    if "top_k" in out and out["top_k"] < 1:
        raise FHIRError("top_k", "must be >= 1")
    if "threshold" in out and not 0.0 <= out["threshold"] <= 1.0:
        raise FHIRError("threshold", "must be in [0, 1]")
    return out


def _code_form(vocab: dict[str, list[str]]):
    """code system family, code -> the form the bundle's vocabulary uses."""
    prefixed = any(c.startswith(("ICD9_", "ICD10_")) for c in vocab["diagnosis"][:50])
    lengths = {len(c) for c in vocab["medication"]}
    atc_level = lengths.pop() if len(lengths) == 1 else None

    def form(family: str, code: str) -> str:
        if family in ("9", "10"):
            code = code.replace(".", "")
            return f"ICD{family}_{code}" if prefixed else code
        if family == "atc" and atc_level is not None and len(code) > atc_level:
            return code[:atc_level]
        return code

    return form


def to_patients(document, vocab: dict[str, list[str]], profile_fields: list[str]) -> tuple[list, dict]:
    """Map a FHIR R4 Bundle to request patients; see the module docstring.

    Args:
        document: the parsed JSON.
        vocab: the bundle's codes (kind -> codes), for the code forms and RxNorm.
        profile_fields: the bundle's profile fields (`marital_status` is read from the Patient).

    Raises:
        FHIRError: not a Bundle, no Patient with an Encounter, an encounter without a start time, or
            a mapped value the request schema refuses.
    """
    if not isinstance(document, dict) or document.get("resourceType") != "Bundle":
        raise FHIRError("resourceType", "the body must be a FHIR R4 Bundle (resourceType \"Bundle\")")
    entries = document.get("entry")
    if not isinstance(entries, list) or not entries:
        raise FHIRError("entry", "the Bundle has no entries")
    form, known = _code_form(vocab), {k: set(v) for k, v in vocab.items()}
    report = {"unused": [], "codings": [], "notes": []}
    by_ref: dict[str, tuple[int, dict]] = {}
    resources = []
    for i, entry in enumerate(entries):
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            report["unused"].append({"entry": f"entry[{i}]", "resource": None, "reason": "no resource with a resourceType"})
            continue
        name = f"{res['resourceType']}/{res.get('id', '')}"
        resources.append((i, res, name))
        by_ref[name] = (i, res)
        if isinstance(entry.get("fullUrl"), str):
            by_ref[entry["fullUrl"]] = (i, res)

    def unused(i: int, name: str, reason: str) -> None:
        report["unused"].append({"entry": f"entry[{i}]", "resource": name, "reason": reason})

    def target(res: dict, field: str, kind: str) -> tuple[int, dict] | None:
        ref = res.get(field, {}).get("reference") if isinstance(res.get(field), dict) else None
        hit = by_ref.get(ref) if isinstance(ref, str) else None
        return hit if hit is not None and hit[1].get("resourceType") == kind else None

    patients: dict[str, dict] = {}  # Patient reference -> {"id", "entry", "profile", "visits": {enc ref: visit}}
    for i, res, name in resources:
        if res["resourceType"] == "Patient":
            patients[name] = {"id": res.get("id"), "entry": i, "profile": _profile(res, profile_fields, report, i), "visits": {}}
    for i, res, name in resources:
        if res["resourceType"] != "Encounter":
            continue
        hit = target(res, "subject", "Patient")
        if hit is None:
            unused(i, name, "its subject is not a Patient of this Bundle")
            continue
        start = res.get("period", {}).get("start") if isinstance(res.get("period"), dict) else None
        if not isinstance(start, str):
            raise FHIRError(f"entry[{i}].resource.period.start", f"{name} has no period.start; the visit order needs it")
        visit = {"visit_id": res.get("id") or f"entry{i}", "visit_time": start, "diagnoses": [], "procedures": [],
                 "medications": [], "entry": i}
        patients[f"Patient/{hit[1].get('id', '')}"]["visits"][name] = visit
    for i, res, name in resources:
        kind = res["resourceType"]
        if kind in ("Patient", "Encounter"):
            continue
        if kind == "Medication" and any(target(r, "medicationReference", "Medication") == (i, res) for _, r, _ in resources):
            continue  # read through the MedicationRequest that names it
        if kind not in USES:
            unused(i, name, f"{kind} is not read (the model reads Condition, Procedure, MedicationRequest)")
            continue
        status = res.get("status") or _first_code(res.get("verificationStatus"))
        if status in UNUSABLE_STATUS:
            unused(i, name, f"status {status!r}")
            continue
        visit = _visit_of(res, name, i, target, patients, report)
        if visit is None:
            continue
        field, vocab_kind, systems = USES[kind]
        concept, where = res.get("code"), "code"
        if kind == "MedicationRequest":
            concept, where = res.get("medicationCodeableConcept"), "medicationCodeableConcept"
            med = target(res, "medicationReference", "Medication")
            if concept is None and med is not None:
                concept, where = med[1].get("code"), f"entry[{med[0]}].resource.code"
        code = _pick(concept, where, i, systems, vocab_kind, form, known, report)
        if code is None:
            unused(i, name, f"no usable coding in {where} (systems read: {', '.join(systems)})")
        else:
            visit[field].append(code)

    out = []
    report["visits"] = {}  # request visit -> the Encounter it came from
    for ref, p in patients.items():
        if not p["visits"]:
            unused(p["entry"], ref, "no Encounter of this patient: nothing to recommend for")
            continue
        visits = list(p["visits"].values())
        try:
            visits.sort(key=lambda v: datetime.fromisoformat(v["visit_time"]))
        except (ValueError, TypeError):
            pass  # left in Bundle order: the visits reader names the bad time
        for j, v in enumerate(visits):
            report["visits"][f"patients[{len(out)}].visits[{j}]"] = f"entry[{v['entry']}]"
        out.append({"patient_id": p["id"] or ref, "visits": [
            {**{k: v[k] for k in ("visit_id", "visit_time", "diagnoses", "procedures", "medications")},
             "profile": p["profile"] if v is visits[-1] else {}} for v in visits]})
    if not out:
        raise FHIRError("entry", "no Patient with an Encounter: the Bundle needs a Patient and at least one Encounter")
    try:
        request = RecommendRequest.model_validate({"patients": out})
    except ValidationError as e:
        first = schema_errors(e)[0]
        raise FHIRError(source_field(first["field"], report), first["message"]) from None
    return request.patient_list(), report


def source_field(field: str, report: dict) -> str:
    """`patients[0].visits[1].diagnoses[0]` -> the same, with the Encounter entry it came from."""
    for visit, entry in report.get("visits", {}).items():
        if field.startswith(visit + ".") or field == visit:
            return f"{field} ({entry})"
    return field


def _first_code(concept) -> str | None:
    codings = concept.get("coding") if isinstance(concept, dict) else None
    if isinstance(codings, list) and codings and isinstance(codings[0], dict):
        return codings[0].get("code")
    return None


def _visit_of(res: dict, name: str, i: int, target, patients: dict, report: dict) -> dict | None:
    """The visit a Condition/Procedure/MedicationRequest belongs to, or None (reported)."""
    encounter = target(res, "encounter", "Encounter")
    subject = target(res, "subject", "Patient")
    if encounter is not None:
        enc_name = f"Encounter/{encounter[1].get('id', '')}"
        for p in patients.values():
            if enc_name in p["visits"]:
                return p["visits"][enc_name]
        report["unused"].append({"entry": f"entry[{i}]", "resource": name, "reason": f"its encounter {enc_name} is not used"})
        return None
    if subject is not None:
        visits = patients[f"Patient/{subject[1].get('id', '')}"]["visits"]
        if len(visits) == 1:
            (visit,) = visits.values()
            report["notes"].append(f"entry[{i}] ({name}) has no encounter reference: given to the patient's only "
                                   f"encounter (entry[{visit['entry']}])")
            return visit
    report["unused"].append({"entry": f"entry[{i}]", "resource": name,
                             "reason": "no encounter reference, and its patient does not have exactly one Encounter"})
    return None


def _pick(concept, where: str, i: int, systems: dict, kind: str, form, known: dict, report: dict) -> str | None:
    """The code of the first usable coding (systems in preference order); every other coding reported."""
    codings = concept.get("coding") if isinstance(concept, dict) else None
    codings = codings if isinstance(codings, list) else []
    usable = []
    for k, c in enumerate(codings):
        system, code = (c.get("system"), c.get("code")) if isinstance(c, dict) else (None, None)
        entry = {"entry": f"entry[{i}]", "path": f"{where}.coding[{k}]", "system": system, "code": code}
        if system not in systems or not isinstance(code, str) or not code.strip():
            report["codings"].append({**entry, "reason": "system not read" if system not in systems else "no code"})
            continue
        family = systems[system]
        value = form(family, code.strip())
        if family == "rxnorm" and value not in known[kind]:
            report["codings"].append({**entry, "reason": "RxNorm code, but this bundle's medications are another "
                                                         "system (ATC classes) and no RxNorm map travels with it; "
                                                         "add an ATC coding"})
            continue
        usable.append((list(systems).index(system), k, value, entry))
    if not usable:
        return None
    usable.sort(key=lambda u: (u[0], u[1]))
    for _, _, _, entry in usable[1:]:
        report["codings"].append({**entry, "reason": "another coding of the same resource was used"})
    return usable[0][2]


def _profile(patient: dict, fields: list[str], report: dict, i: int) -> dict[str, str]:
    status = _first_code(patient.get("maritalStatus"))
    if status is None:
        return {}
    if "marital_status" not in fields:
        report["codings"].append({"entry": f"entry[{i}]", "path": "maritalStatus.coding[0]", "system": None,
                                  "code": status, "reason": "this bundle has no marital_status profile field"})
        return {}
    if status not in MARITAL:
        report["codings"].append({"entry": f"entry[{i}]", "path": "maritalStatus.coding[0]", "system": None,
                                  "code": status, "reason": "not an HL7 v3 MaritalStatus code this service maps"})
        return {}
    return {"marital_status": MARITAL[status]}
