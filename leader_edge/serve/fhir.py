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
- Resources are told apart by their entry, not by `id`: a reference names an entry by its
  `fullUrl` (`urn:uuid:...` in a transaction Bundle, where resources have no id) or by `Type/id`.
  Two entries with the same fullUrl or Type/id are refused (422 naming the entry); a reference that
  names no entry, or an entry of another type, is reported and never guessed at; a resource whose
  subject is not its encounter's patient is reported.
- A resource whose status says it is no fact of the visit (cancelled Encounter, refuted Condition,
  not-done Procedure, cancelled/draft MedicationRequest, ...; `SKIPPED_STATUS`) is reported.

Nothing is dropped silently: `report["unused"]` lists every resource not used and why,
`report["codings"]` every coding not used (unknown system, another coding of the same resource
chosen, no map), `report["notes"]` assumptions made (a resource without an encounter reference).
"""

from __future__ import annotations

from datetime import datetime

from pydantic import ValidationError

from leader_edge.serve.schema import EXCLUSIVE, RecommendRequest, schema_errors

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
# Statuses (FHIR R4 value sets) under which a resource states no fact of the visit: it is listed in
# `unused` with its status. Kept: Encounter `planned` (the visit being recommended for may not have
# started); Procedure `stopped`/`on-hold`/`in-progress` (begun, so performed in part); MedicationRequest
# `stopped` (prescribed and given, then halted: a MIMIC prescriptions row, the model's training
# data, is written for every order of the stay, discontinued ones included) and `on-hold`/`completed`.
# Condition.clinicalStatus is not read: it is the condition's state now (`resolved` for most of
# a past admission's diagnoses), not whether it was diagnosed at the encounter the Condition names.
SKIPPED_STATUS = {
    "Encounter": ("status", {"cancelled": "the encounter was cancelled", "entered-in-error": "entered in error"}),
    "Condition": ("verificationStatus", {"refuted": "the diagnosis was refuted", "entered-in-error": "entered in error"}),
    "Procedure": ("status", {"not-done": "the procedure was not done", "entered-in-error": "entered in error",
                             "preparation": "the procedure has not started (preparation)"}),
    "MedicationRequest": ("status", {"cancelled": "withdrawn before any administration", "draft": "a draft, not yet "
                                     "prescribed", "entered-in-error": "entered in error"}),
}
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
    if "top_k" in out and "threshold" in out:
        raise FHIRError("threshold", EXCLUSIVE)
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
        FHIRError: not a Bundle, two entries with one fullUrl or Type/id, no Patient with an
            Encounter, an encounter without a start time, or a mapped value the request schema refuses.
    """
    if not isinstance(document, dict) or document.get("resourceType") != "Bundle":
        raise FHIRError("resourceType", "the body must be a FHIR R4 Bundle (resourceType \"Bundle\")")
    entries = document.get("entry")
    if not isinstance(entries, list) or not entries:
        raise FHIRError("entry", "the Bundle has no entries")
    form, known = _code_form(vocab), {k: set(v) for k, v in vocab.items()}
    report = {"unused": [], "codings": [], "notes": []}
    # Resources are keyed by entry index: a transaction Bundle's resources often have no `id` and
    # refer to each other by their `urn:uuid:` fullUrl, so "Type/id" cannot be the key.
    resources: dict[int, dict] = {}
    labels: dict[int, str] = {}  # entry -> "Type/id", else its fullUrl, else "Type (entry[i])": how the report names it
    index: dict[str, int] = {}  # fullUrl and "Type/id" -> entry: what a reference may say
    for i, entry in enumerate(entries):
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            report["unused"].append({"entry": f"entry[{i}]", "resource": None, "reason": "no resource with a resourceType"})
            continue
        resources[i] = res
        rid, full = res.get("id"), entry.get("fullUrl")
        keys = [(f"{res['resourceType']}/{rid}", "resource.id")] if isinstance(rid, str) and rid else []
        keys += [(full, "fullUrl")] if isinstance(full, str) and full else []
        labels[i] = keys[0][0] if keys else f"{res['resourceType']} (entry[{i}])"
        for key, field in keys:
            if index.setdefault(key, i) != i:
                raise FHIRError(f"entry[{i}].{field}", f"{key!r} also names entry[{index[key]}]: a reference to it "
                                                       "would be ambiguous; give each resource its own id and fullUrl")

    for i, res in resources.items():  # contained resources are not read: said, not dropped silently
        contained = res.get("contained")
        if isinstance(contained, list) and contained:
            kinds = sorted({c["resourceType"] if isinstance(c, dict) and isinstance(c.get("resourceType"), str) else "?"
                            for c in contained})
            report["unused"].append({"entry": f"entry[{i}].contained", "resource": labels[i],
                                     "reason": f"{len(contained)} contained resource(s) ({', '.join(kinds) or '?'}) are not "
                                               "read: send them as entries of the Bundle"})

    def ident(i: int) -> str:
        """The id a patient or visit gets in the request: the resource's id, else its fullUrl, else its entry."""
        rid, full = resources[i].get("id"), entries[i].get("fullUrl")
        return rid if isinstance(rid, str) and rid else full if isinstance(full, str) and full else f"entry[{i}]"

    def unused(i: int, reason: str) -> None:
        report["unused"].append({"entry": f"entry[{i}]", "resource": labels[i], "reason": reason})

    def resolve(res: dict, field: str, kind: str) -> tuple[int | None, str | None]:
        """(entry, None) for a reference to a `kind` of this Bundle; (None, why not); (None, None) if absent."""
        value = res.get(field)
        if value is None:
            return None, None
        ref = value.get("reference") if isinstance(value, dict) else None
        if not isinstance(ref, str):
            return None, f"its {field} has no reference"
        k = index.get(ref)
        if k is None:
            return None, f"its {field} reference {ref!r} names no entry of this Bundle (by fullUrl or Type/id)"
        if resources[k]["resourceType"] != kind:
            return None, f"its {field} reference {ref!r} is entry[{k}], a {resources[k]['resourceType']}, not a {kind}"
        return k, None

    patients: dict[int, dict] = {}  # Patient entry -> {"id", "entry", "profile", "visits": {Encounter entry: visit}}
    for i, res in resources.items():
        if res["resourceType"] == "Patient":
            patients[i] = {"id": ident(i), "entry": i, "profile": _profile(res, profile_fields, report, i), "visits": {}}
    visits: dict[int, dict] = {}  # Encounter entry -> its visit
    dropped: dict[int, str] = {}  # Encounter entry -> why it is not a visit
    for i, res in resources.items():
        if res["resourceType"] != "Encounter":
            continue
        k, why = resolve(res, "subject", "Patient")
        why = _skipped(res) or why or (None if k is not None else "no subject: whose visit it is is unknown")
        if why is not None:
            dropped[i] = why
            unused(i, why)
            continue
        start = res.get("period", {}).get("start") if isinstance(res.get("period"), dict) else None
        if not isinstance(start, str):
            raise FHIRError(f"entry[{i}].resource.period.start", f"{labels[i]} has no period.start; the visit order needs it")
        visits[i] = {"visit_id": ident(i), "visit_time": start, "diagnoses": [], "procedures": [], "medications": [],
                     "entry": i, "patient": k}
        patients[k]["visits"][i] = visits[i]

    def visit_of(i: int, res: dict) -> dict | None:
        """The visit a Condition/Procedure/MedicationRequest belongs to, or None (reported)."""
        enc, why = resolve(res, "encounter", "Encounter")
        subject, why_subject = resolve(res, "subject", "Patient")
        if why is not None:  # a reference that resolves to nothing is never guessed at
            return unused(i, why)
        if enc is not None:
            if enc not in visits:
                return unused(i, f"its encounter {labels[enc]} (entry[{enc}]) is not used: {dropped[enc]}")
            visit = visits[enc]
            if subject is not None and subject != visit["patient"]:
                return unused(i, f"its subject {labels[subject]} (entry[{subject}]) is not the patient of its encounter "
                                 f"({labels[visit['patient']]}, entry[{visit['patient']}])")
            if why_subject is not None:
                report["notes"].append(f"entry[{i}] ({labels[i]}): {why_subject}; read as its encounter's patient's")
            return visit
        if why_subject is not None:
            return unused(i, why_subject)
        if subject is not None and len(patients[subject]["visits"]) == 1:
            (visit,) = patients[subject]["visits"].values()
            report["notes"].append(f"entry[{i}] ({labels[i]}) has no encounter reference: given to the patient's only "
                                   f"encounter (entry[{visit['entry']}])")
            return visit
        return unused(i, "no encounter reference, and its patient does not have exactly one Encounter")

    read_through = {resolve(r, "medicationReference", "Medication")[0] for r in resources.values()
                    if r["resourceType"] == "MedicationRequest"}
    for i, res in resources.items():
        kind = res["resourceType"]
        if kind in ("Patient", "Encounter") or (kind == "Medication" and i in read_through):
            continue  # a Medication is read through the MedicationRequest that names it
        if kind not in USES:
            unused(i, f"{kind} is not read (the model reads Condition, Procedure, MedicationRequest)")
            continue
        why = _skipped(res)
        if why is not None:
            unused(i, why)
            continue
        visit = visit_of(i, res)
        if visit is None:
            continue
        field, vocab_kind, systems = USES[kind]
        concept, where = res.get("code"), "code"
        if kind == "MedicationRequest":
            concept, where = res.get("medicationCodeableConcept"), "medicationCodeableConcept"
            med, why = resolve(res, "medicationReference", "Medication")
            if concept is None and med is not None:
                concept, where = resources[med].get("code"), f"entry[{med}].resource.code"
            elif concept is None and why is not None:
                unused(i, why)
                continue
        code = _pick(concept, where, i, systems, vocab_kind, form, known, report)
        if code is None:
            unused(i, f"no usable coding in {where} (systems read: {', '.join(systems)})")
        else:
            visit[field].append(code)

    out = []
    report["visits"] = {}  # request visit -> the Encounter it came from
    for i, p in patients.items():
        if not p["visits"]:
            unused(i, "no Encounter of this patient: nothing to recommend for")
            continue
        rows = list(p["visits"].values())
        try:
            rows.sort(key=lambda v: datetime.fromisoformat(v["visit_time"]))
        except (ValueError, TypeError):
            pass  # left in Bundle order: the visits reader names the bad time
        for j, v in enumerate(rows):
            report["visits"][f"patients[{len(out)}].visits[{j}]"] = f"entry[{v['entry']}]"
        out.append({"patient_id": p["id"], "visits": [
            {**{k: v[k] for k in ("visit_id", "visit_time", "diagnoses", "procedures", "medications")},
             "profile": p["profile"] if v is rows[-1] else {}} for v in rows]})
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


def _skipped(res: dict) -> str | None:
    """Why a resource states no fact of a visit (`SKIPPED_STATUS`, MedicationRequest.doNotPerform), or None."""
    if res["resourceType"] == "MedicationRequest" and res.get("doNotPerform") is True:
        return "doNotPerform: an order not to give it"
    field, reasons = SKIPPED_STATUS.get(res["resourceType"], (None, {}))
    value = res.get(field) if field else None
    codings = value.get("coding") if isinstance(value, dict) else None
    codes = [value] if isinstance(value, str) else [c.get("code") for c in codings if isinstance(c, dict)] \
        if isinstance(codings, list) else []
    for code in codes:
        if isinstance(code, str) and code in reasons:
            return f"{field} {code!r}: {reasons[code]}"
    return None


def _first_code(concept) -> str | None:
    codings = concept.get("coding") if isinstance(concept, dict) else None
    if isinstance(codings, list) and codings and isinstance(codings[0], dict):
        return codings[0].get("code")
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
