"""Synthetic MIMIC-III-like cohorts with the structure that makes LEADER's method matter.

The generative model (described in full in docs/DATA.md):

* ~28 disease families, each a set of real ICD-9 diagnosis codes whose CMS short titles share a
  keyword ("pneumonia", "hrt fail", "renal", ...). A family has 3 frequent "head" codes and a long
  tail of up to 40 rare codes; the tail gets 45% of the family's mass, so at 2,000 patients a tail
  code is seen ~5 times - too rarely for an ID-only model, while its name still reveals the family.
* Each family owns 3-6 medication classes (ATC-3-shaped synthetic codes) named with the family's
  word ("pneumonia inhibitors"), plus 16 general ICU classes ("analgesic agents") given by base rate.
* A patient has a few chronic families (present at most visits) and each visit adds acute ones.
  Classes of chronic families carry over to the next visit (history effect).
* DDI pairs (7% of cross-family class pairs) that co-prescription avoids 85% of the time.
* Profile fields (insurance, language, religion, marital status, ethnicity) shift family and
  general-class rates mildly.

Everything is drawn from one `numpy.random.Generator` seeded by `seed`: same seed, same cohort.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np

from leader_edge.data.dataset import Dataset, Visit
from leader_edge.errors import ConfigError
from leader_edge.data.icd import icd_names

log = logging.getLogger(__name__)

# (word used in medication class names, regex over lower-cased ICD-9 short titles, chronic?).
# Order matters: a code joins the first family it matches ("Mal neo liver" is a neoplasm).
FAMILIES: tuple[tuple[str, str, bool], ...] = (
    ("neoplasm", r"mal neo|malig|lymphoma|leukemia|neopl", False),
    ("diabetes", r"diabet|^dmi", True),
    ("hypertension", r"hypertens", True),
    ("pneumonia", r"pneumon", False),
    ("renal", r"\brenal|kidney|nephr", True),
    ("heart failure", r"hrt fail|heart fail|cardiomyop", True),
    ("sepsis", r"sepsis|septic", False),
    ("fracture", r"fracture|\bfx\b", False),
    ("asthma", r"asthma", True),
    ("bronchitis", r"bronch|emphysema", True),
    ("atrial rhythm", r"atrial|tachycard|fibrillat|flutter|arrhythm|brady", True),
    ("coronary", r"coronar|myocard|^ami |angina|ischem", True),
    ("cerebral", r"cerebr|stroke|intracran|carotid", False),
    ("epilepsy", r"epilep|convuls|seiz", True),
    ("depression", r"depress|schizo|bipolar|psychos|anxiety", True),
    ("alcohol", r"alcohol", False),
    ("opioid", r"opioid|drug depend|drug abuse|cocaine|cannabis|amphetamin", False),
    ("hepatitis", r"hepat|liver|cirrho|hpt ", True),
    ("pancreatitis", r"pancrea", False),
    ("anemia", r"anemia", False),
    ("thyroid", r"thyro|goiter", True),
    ("arthritis", r"arthrit|gout|arthropath", True),
    ("cellulitis", r"cellulitis|abscess", False),
    ("urinary", r"urin|cystitis|bladder|pyelo", False),
    ("thrombosis", r"thromb|embol", False),
    ("gastric", r"gastr|ulcer|esophag|duoden", False),
    ("dementia", r"dementia|alzheim|parkins|delirium", True),
    ("lipid", r"lipid|cholest|obesity", True),
)
# Titles that would make odd ICU diagnoses (newborn, pregnancy, poisoning, history-of ...).
EXCLUDE = re.compile(
    r"^tb|tb |^nb |deliver|antepart|postpart|puerp|newborn|fetus|fetal|hx|family|poison|late eff|"
    r"screen|exam|pregn|matern|adv eff|toxic|congen|w/o mention|in remis"
)
CLASS_SUFFIXES = ("agents", "inhibitors", "modulators", "blockers", "combinations", "derivatives")
GENERAL_CLASSES = (
    "analgesic", "laxative", "electrolyte", "anticoagulant", "antiemetic", "sedative", "vitamin",
    "antibacterial", "antacid", "diuretic", "antipyretic", "antifungal", "corticosteroid",
    "vasopressor", "antihistamine", "nutrition",
)
# General classes a patient keeps taking (they carry over like chronic family classes).
CHRONIC_GENERAL = ("anticoagulant", "vitamin", "diuretic")
ATC_LETTERS = "ABCDGHJLMNPRS"  # WHO ATC anatomical groups; the rest of each code is synthetic

# Profile fields: (value, probability). Missing MIMIC values are "" (NaN in ADMISSIONS.csv).
PROFILE_VALUES: dict[str, tuple[tuple[str, float], ...]] = {
    "insurance": (("Medicare", 0.55), ("Private", 0.30), ("Medicaid", 0.10), ("Government", 0.03), ("Self Pay", 0.02)),
    "religion": (("CATHOLIC", 0.35), ("NOT SPECIFIED", 0.22), ("UNOBTAINABLE", 0.13), ("PROTESTANT QUAKER", 0.12),
                 ("JEWISH", 0.08), ("OTHER", 0.05), ("EPISCOPALIAN", 0.02), ("CHRISTIAN SCIENTIST", 0.02), ("MUSLIM", 0.01)),
    "marital_status": (("MARRIED", 0.43), ("SINGLE", 0.25), ("WIDOWED", 0.13), ("", 0.09), ("DIVORCED", 0.06),
                       ("SEPARATED", 0.01), ("UNKNOWN (DEFAULT)", 0.03)),
    "ethnicity": (("WHITE", 0.70), ("BLACK/AFRICAN AMERICAN", 0.09), ("UNKNOWN/NOT SPECIFIED", 0.08),
                  ("HISPANIC OR LATINO", 0.04), ("ASIAN", 0.03), ("OTHER", 0.03), ("UNABLE TO OBTAIN", 0.02),
                  ("HISPANIC/LATINO - PUERTO RICAN", 0.01)),
}
PROFILE_FIELDS = ("insurance", "language", "religion", "marital_status", "ethnicity")
# Language follows ethnicity; about a third of MIMIC-III admissions have no language recorded.
LANGUAGE_BY_ETHNICITY = {
    "HISPANIC OR LATINO": (("SPAN", 0.6), ("ENGL", 0.25), ("", 0.15)),
    "HISPANIC/LATINO - PUERTO RICAN": (("SPAN", 0.6), ("ENGL", 0.25), ("", 0.15)),
    "ASIAN": (("CANT", 0.3), ("MAND", 0.2), ("ENGL", 0.35), ("", 0.15)),
    "WHITE": (("ENGL", 0.6), ("", 0.3), ("RUSS", 0.05), ("PORT", 0.05)),
}
LANGUAGE_DEFAULT = (("ENGL", 0.65), ("", 0.3), ("HAIT", 0.05))
# The mild signal: multipliers on family rates (patients' chronic and acute families).
PROFILE_EFFECTS: dict[tuple[str, str], dict[str, float]] = {
    ("insurance", "Medicare"): {"heart failure": 1.8, "renal": 1.5, "dementia": 2.0, "atrial rhythm": 1.6, "coronary": 1.4},
    ("insurance", "Private"): {"fracture": 1.8, "neoplasm": 1.3, "dementia": 0.4},
    ("insurance", "Medicaid"): {"alcohol": 2.5, "opioid": 3.0, "hepatitis": 2.0, "depression": 1.8},
    ("insurance", "Self Pay"): {"alcohol": 2.0, "fracture": 2.0},
    ("ethnicity", "BLACK/AFRICAN AMERICAN"): {"hypertension": 2.0, "renal": 1.8, "diabetes": 1.5},
    ("ethnicity", "HISPANIC OR LATINO"): {"diabetes": 2.0, "hepatitis": 1.4},
    ("ethnicity", "HISPANIC/LATINO - PUERTO RICAN"): {"diabetes": 2.0, "asthma": 1.8},
    ("ethnicity", "ASIAN"): {"hepatitis": 2.2, "cerebral": 1.4},
    ("marital_status", "WIDOWED"): {"dementia": 1.8, "heart failure": 1.4, "fracture": 1.3},
    ("marital_status", "SINGLE"): {"alcohol": 1.5, "depression": 1.5, "opioid": 1.5},
}


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generative model; defaults give MIMIC-III-like shape (docs/DATA.md)."""

    patients: int = 2000  # the teacher must train on this in <= 10 CPU minutes
    seed: int = 42
    single_visit_share: float = 0.72  # MIMIC-III: ~72% of patients have one admission
    head_codes: int = 3  # frequent codes per family
    tail_codes: int = 40  # rare codes per family (names still reveal the family)
    tail_mass: float = 0.55  # share of a family's diagnoses drawn from its tail
    background_diagnoses: float = 5.0  # Poisson mean of family-free diagnoses per visit
    background_procedures: float = 2.8  # Poisson mean of family-free procedures per visit
    carry_over: float = 0.85  # chance a chronic class of the last visit is given again
    ddi_share: float = 0.07  # share of cross-family class pairs that interact
    ddi_avoidance: float = 0.85  # chance an interacting second class is withheld

    def __post_init__(self) -> None:
        if not isinstance(self.patients, int) or self.patients < 1:
            raise ConfigError(f"patients must be a positive integer, got {self.patients!r}; pass e.g. --patients 2000")
        for name in ("single_visit_share", "tail_mass", "carry_over", "ddi_share", "ddi_avoidance"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {value!r}")


@dataclass
class World:
    """The fixed part of the model: codes, names, families, medication classes, DDI pairs.

    Index arrays point into `dx_codes` / `proc_codes` / `med_codes`.
    """

    dx_codes: list[str]
    proc_codes: list[str]
    med_codes: list[str]
    med_names: list[str]
    med_family: np.ndarray  # [M] family index, -1 for general classes
    med_chronic: np.ndarray  # [M] bool, carries over between visits
    general_p: np.ndarray  # [M] base rate of general classes, 0 for family classes
    family_dx: list[np.ndarray]  # per family: diagnosis indices, head first
    family_dx_cdf: list[np.ndarray]
    family_proc: list[np.ndarray]
    family_meds: list[np.ndarray]
    family_med_p: list[np.ndarray]
    family_general: np.ndarray  # [F] general class each family boosts
    family_weight: np.ndarray  # [F] base rate of each family
    background_dx: np.ndarray
    background_dx_cdf: np.ndarray
    background_proc: np.ndarray
    background_proc_cdf: np.ndarray
    ddi: np.ndarray  # [M, M] bool, symmetric
    insurance_general: dict[str, np.ndarray] = field(default_factory=dict)  # [M] multipliers
    ddi_partners: list[frozenset[int]] = field(default_factory=list)  # [M] classes interacting with each

    def __post_init__(self) -> None:
        self.ddi_partners = [frozenset(np.flatnonzero(row).tolist()) for row in self.ddi]

    @property
    def family_words(self) -> list[str]:
        return [f[0] for f in FAMILIES]

    def ddi_pairs(self) -> list[tuple[str, str]]:
        a, b = np.nonzero(np.triu(self.ddi, 1))
        return sorted((min(self.med_codes[i], self.med_codes[j]), max(self.med_codes[i], self.med_codes[j])) for i, j in zip(a, b))


def _zipf_cdf(n: int, power: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** power
    return np.cumsum(w / w.sum())


def build_world(rng: np.random.Generator, config: SynthConfig) -> World:
    """Draw families, code sets, medication classes and DDI pairs from real ICD-9 titles."""
    dx_titles = icd_names("diagnosis", 9)
    proc_titles = icd_names("procedure", 9)
    patterns = [re.compile(p) for _, p, _ in FAMILIES]
    members: list[list[str]] = [[] for _ in FAMILIES]
    free: list[str] = []
    for code in sorted(dx_titles):
        title = dx_titles[code].lower()
        if EXCLUDE.search(title):
            continue
        hit = next((i for i, p in enumerate(patterns) if p.search(title)), None)
        (members[hit] if hit is not None else free).append(code)

    dx_codes: list[str] = []
    family_dx, family_dx_cdf = [], []
    for codes in members:
        # Head codes: prefer the "NOS"/"unspecified" titles clinicians code most often.
        generic = [c for c in codes if re.search(r"\bnos\b|unsp", dx_titles[c].lower())]
        order = list(rng.permutation(generic)) + list(rng.permutation([c for c in codes if c not in set(generic)]))
        head = order[: config.head_codes]
        tail = [c for c in rng.permutation(codes) if c not in set(head)][: config.tail_codes]
        chosen = head + tail
        start = len(dx_codes)
        dx_codes.extend(chosen)
        w_head = np.array([1.0, 0.6, 0.4, 0.3, 0.2][: len(head)])
        w_head *= (1.0 - config.tail_mass if tail else 1.0) / w_head.sum()
        w = np.concatenate([w_head, np.full(len(tail), config.tail_mass / max(len(tail), 1))])
        family_dx.append(np.arange(start, start + len(chosen)))
        family_dx_cdf.append(np.cumsum(w / w.sum()))
    bg = list(rng.permutation(free)[:250])
    background_dx = np.arange(len(dx_codes), len(dx_codes) + len(bg))
    dx_codes.extend(bg)

    procs = list(rng.permutation(sorted(proc_titles))[:160])
    family_proc = [rng.choice(len(procs), size=4, replace=False) for _ in FAMILIES]

    med_codes, med_names, med_family, med_chronic, med_base = [], [], [], [], []
    family_meds, family_med_p = [], []
    for f, (word, _, chronic) in enumerate(FAMILIES):
        n = int(rng.integers(3, 6))
        letter = ATC_LETTERS[f % len(ATC_LETTERS)]
        idx = []
        for k in range(n):
            idx.append(len(med_codes))
            med_codes.append(f"{letter}{11 + f:02d}{'ABCDEF'[k]}")
            med_names.append(f"{word} {CLASS_SUFFIXES[k]}")
            med_family.append(f)
            med_chronic.append(chronic and k < 2)
            med_base.append(0.0)
        family_meds.append(np.array(idx))
        family_med_p.append(np.clip(0.7 - 0.1 * np.arange(n) + rng.normal(0, 0.05, n), 0.15, 0.9))
    base = np.sort(np.clip(np.linspace(0.65, 0.15, len(GENERAL_CLASSES)) + rng.normal(0, 0.05, len(GENERAL_CLASSES)), 0.05, 0.9))[::-1]
    general_start = len(med_codes)
    for k, word in enumerate(GENERAL_CLASSES):
        med_codes.append(f"V{50 + k:02d}{'ABCDEFGH'[k % 8]}")
        med_names.append(f"{word} agents")
        med_family.append(-1)
        med_chronic.append(word in CHRONIC_GENERAL)
        med_base.append(float(base[k]))
    m = len(med_codes)
    med_family_arr = np.array(med_family)

    # DDI: cross-family pairs only (a family's own classes are co-prescribed by design).
    upper = np.triu(rng.random((m, m)) < config.ddi_share, 1)
    upper &= med_family_arr[:, None] != med_family_arr[None, :]
    ddi = upper | upper.T

    weights = 1.0 / np.arange(1, len(FAMILIES) + 1) ** 0.7
    return World(
        dx_codes=dx_codes,
        proc_codes=procs,
        med_codes=med_codes,
        med_names=med_names,
        med_family=med_family_arr,
        med_chronic=np.array(med_chronic),
        general_p=np.array(med_base),
        family_dx=family_dx,
        family_dx_cdf=family_dx_cdf,
        family_proc=family_proc,
        family_meds=family_meds,
        family_med_p=family_med_p,
        family_general=general_start + rng.integers(0, len(GENERAL_CLASSES), len(FAMILIES)),
        family_weight=rng.permutation(weights),
        background_dx=background_dx,
        background_dx_cdf=_zipf_cdf(len(bg), 0.8),
        background_proc=np.arange(len(procs)),
        background_proc_cdf=_zipf_cdf(len(procs), 0.9),
        ddi=ddi,
        insurance_general={
            value: np.exp(rng.normal(0, 0.4, m)) for value, _ in PROFILE_VALUES["insurance"]
        },
    )


@dataclass
class Cohort:
    """Generated patients and visits. Visits are grouped by patient and ordered by time."""

    world: World
    subject_ids: np.ndarray  # [P] int, MIMIC SUBJECT_ID
    profiles: list[dict[str, str]]  # [P] field -> value ("" = not recorded)
    visit_patient: np.ndarray  # [V] index into subject_ids
    hadm_ids: np.ndarray  # [V] int, MIMIC HADM_ID
    admit_times: list[datetime]  # [V]
    diagnoses: list[np.ndarray] = field(default_factory=list)  # [V] indices into world.dx_codes
    procedures: list[np.ndarray] = field(default_factory=list)  # [V] indices into world.proc_codes
    medications: list[np.ndarray] = field(default_factory=list)  # [V] indices into world.med_codes


def _pick(u: float, options: tuple[tuple[str, float], ...]) -> str:
    """The option whose cumulative probability interval holds the uniform draw `u`."""
    total = sum(p for _, p in options)
    acc = 0.0
    for value, p in options:
        acc += p / total
        if u < acc:
            return value
    return options[-1][0]


def _draw(rng: np.random.Generator, cdf: np.ndarray, k: int) -> np.ndarray:
    """k draws (with replacement) by inverse CDF; cheaper than rng.choice(p=...) per call."""
    return np.minimum(np.searchsorted(cdf, rng.random(k)), len(cdf) - 1)


def _profile(rng: np.random.Generator) -> dict[str, str]:
    u = rng.random(5).tolist()
    out = {name: _pick(u[i], PROFILE_VALUES[name]) for i, name in enumerate(("insurance", "religion", "marital_status", "ethnicity"))}
    out["language"] = _pick(u[4], LANGUAGE_BY_ETHNICITY.get(out["ethnicity"], LANGUAGE_DEFAULT))
    return {name: out[name] for name in PROFILE_FIELDS}


def _family_rates(world: World, profile: dict[str, str]) -> np.ndarray:
    rates = world.family_weight.copy()
    words = world.family_words
    for (name, value), effects in PROFILE_EFFECTS.items():
        if profile[name] == value:
            for word, mult in effects.items():
                rates[words.index(word)] *= mult
    return rates / rates.sum()


def _visit_medications(
    rng: np.random.Generator, world: World, active: np.ndarray, profile: dict[str, str], previous: np.ndarray | None,
    config: SynthConfig,
) -> np.ndarray:
    """Medication indices of one visit: general base rates, family classes, carry-over, DDI avoidance."""
    p = world.general_p * world.insurance_general[profile["insurance"]]
    for f in active:
        meds = world.family_meds[f]
        p[meds] = np.maximum(p[meds], world.family_med_p[f])
        g = world.family_general[f]
        p[g] = max(p[g], 0.6)
    p = np.clip(p * rng.uniform(0.6, 1.4), 0.0, 0.97)  # visit severity: variance no input explains
    given = rng.random(len(p)) < p
    if previous is not None and len(previous):
        keep = previous[world.med_chronic[previous] & (rng.random(len(previous)) < config.carry_over)]
        given[keep] = True
        p[keep] = np.maximum(p[keep], 0.9)
    chosen = np.flatnonzero(given)
    # Greedy DDI avoidance: the most needed classes first; an interacting later one is
    # withheld with probability ddi_avoidance. Python sets: ~10x faster than numpy at ~12 classes.
    coin = rng.random(len(chosen)) < config.ddi_avoidance
    kept: set[int] = set()
    for m, avoid in zip(chosen[np.argsort(-p[chosen], kind="stable")].tolist(), coin.tolist()):
        if avoid and not kept.isdisjoint(world.ddi_partners[m]):
            continue
        kept.add(m)
    return np.array(sorted(kept), dtype=np.int64)


def generate_cohort(config: SynthConfig) -> Cohort:
    """Draw a world and a cohort of `config.patients` patients from `config.seed`."""
    rng = np.random.default_rng(config.seed)
    world = build_world(rng, config)
    n = config.patients
    n_visits = np.where(rng.random(n) < config.single_visit_share, 1, 1 + rng.geometric(0.7, n))
    total = int(n_visits.sum())
    id_space = max(100_000, 2 * n)
    subject_ids = np.sort(rng.choice(id_space, size=n, replace=False)) + 1
    hadm_ids = rng.choice(max(100_000, 2 * total), size=total, replace=False) + 100_000
    chronic_families = np.array([i for i, f in enumerate(FAMILIES) if f[2]])
    cohort = Cohort(world, subject_ids, [], np.repeat(np.arange(n), n_visits), hadm_ids, [])
    epoch = datetime(2100, 1, 1)
    for i in range(n):
        profile = _profile(rng)
        cohort.profiles.append(profile)
        rates = _family_rates(world, profile)
        rates_cdf = np.cumsum(rates)
        chronic_rates = rates[chronic_families] / rates[chronic_families].sum()
        n_chronic = min(int(rng.poisson(1.0)), len(chronic_families))
        chronic = np.unique(chronic_families[_draw(rng, np.cumsum(chronic_rates), n_chronic)])
        time = epoch + timedelta(days=int(rng.integers(0, 365 * 100)), minutes=int(rng.integers(0, 24 * 60)))
        previous = None
        for _ in range(n_visits[i]):
            acute = _draw(rng, rates_cdf, 1 + rng.binomial(2, 0.35))
            active = set(chronic[rng.random(len(chronic)) < 0.8].tolist()) | set(acute.tolist())
            active = sorted(active)
            dx = [world.family_dx[f][_draw(rng, world.family_dx_cdf[f], 1 + rng.binomial(2, 0.5))] for f in active]
            dx.append(world.background_dx[_draw(rng, world.background_dx_cdf, rng.poisson(config.background_diagnoses))])
            proc = [world.family_proc[f][rng.integers(0, 4, 1)] for f in active if rng.random() < 0.6]
            proc.append(world.background_proc[_draw(rng, world.background_proc_cdf, rng.poisson(config.background_procedures))])
            dx_all = np.concatenate(dx)
            cohort.diagnoses.append(rng.permutation(dx_all[np.sort(np.unique(dx_all, return_index=True)[1])]))
            proc_all = np.concatenate(proc)
            cohort.procedures.append(proc_all[np.sort(np.unique(proc_all, return_index=True)[1])])
            previous = _visit_medications(rng, world, active, profile, previous, config)
            cohort.medications.append(previous)
            cohort.admit_times.append(time)
            time += timedelta(days=int(rng.integers(20, 700)), minutes=int(rng.integers(0, 24 * 60)))
    return cohort


def cohort_dataset(cohort: Cohort) -> Dataset:
    """The cohort as a canonical `Dataset` (names from ICD-9 titles and the synthetic classes)."""
    w = cohort.world
    dx_titles, proc_titles = icd_names("diagnosis", 9), icd_names("procedure", 9)
    visits = []
    for v, p in enumerate(cohort.visit_patient):
        profile = cohort.profiles[p]
        visits.append(Visit(
            patient_id=str(cohort.subject_ids[p]),
            visit_id=str(cohort.hadm_ids[v]),
            time=cohort.admit_times[v],
            diagnoses=tuple(w.dx_codes[i] for i in cohort.diagnoses[v]),
            procedures=tuple(w.proc_codes[i] for i in cohort.procedures[v]),
            medications=tuple(w.med_codes[i] for i in cohort.medications[v]),
            profile=tuple((name, profile[name]) for name in PROFILE_FIELDS),
        ))
    names = {
        "diagnosis": {c: dx_titles[c] for c in w.dx_codes},
        "procedure": {c: proc_titles[c] for c in w.proc_codes},
        "medication": dict(zip(w.med_codes, w.med_names)),
    }
    return Dataset(visits=visits, names=names, ddi=w.ddi_pairs())


def synth_dataset(patients: int = 2000, seed: int = 42) -> Dataset:
    """A synthetic canonical dataset (see docs/DATA.md for the generative model)."""
    return cohort_dataset(generate_cohort(SynthConfig(patients=patients, seed=seed)))
