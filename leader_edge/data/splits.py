"""Splits and samples: which patients train, select and score a model, and what is predicted.

A `Protocol` (LEADER's or GAMENet/SafeDrug's) splits a dataset's patients and says which visits are
scored; `dataset_splits` turns a `Dataset` into train/val/test `Sample`s. Every report names its
protocol. `leader_edge.data.dataset` re-exports these names (training and the CLI import them there).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from leader_edge.errors import ConfigError

if TYPE_CHECKING:
    from leader_edge.data.dataset import Dataset, Visit

# LEADER's split: 8:1:1 by patient.
SPLIT_RATIOS = (0.8, 0.1, 0.1)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True, slots=True)
class Sample:
    """A prediction target: `visits[-1]` is the current visit, the earlier ones its history."""

    patient_id: str
    visits: tuple[Visit, ...]

    @property
    def target(self) -> Visit:
        return self.visits[-1]

    @property
    def history(self) -> tuple[Visit, ...]:
        return self.visits[:-1]


@dataclass(frozen=True)
class Protocol:
    """How a dataset is split and scored; one of `PROTOCOLS`, named in every report.

    Attributes:
        name: "leader" or "safedrug".
        ratios: train/val/test shares of the patients.
        shuffle: deal patients in a seeded random order; False keeps file order.
        eval_all_visits: score every visit of a val/test patient (with the visits before it)
            instead of the last one.
        per_patient: average a patient's visits first, then over patients.
        frac: each subsample draws `frac` of the patients with replacement, `rounds` times.
    """

    name: str
    ratios: tuple[float, float, float]
    shuffle: bool
    eval_all_visits: bool
    per_patient: bool
    frac: float = 0.8
    rounds: int = 10

    def describe(self, *, split: bool = True) -> str:
        """The protocol in words; `split=False` for files scored as they are (`evaluate --truth`),
        where no split is made and every patient in the file is a test patient."""
        order = "seeded shuffle" if self.shuffle else "file order"
        who = "a test patient" if split else "a patient"
        scored = f"every visit of {who}, averaged per patient" if self.per_patient else f"each {who.split(' ', 1)[1]}'s last visit"
        shares = ":".join(f"{r:.3g}" for r in self.ratios)
        head = f"patients split {shares} ({order}); " if split else "every patient in the file; "
        return (f"protocol {self.name}: {head}scored: {scored}; mean ± std over "
                f"{self.rounds} draws of {self.frac:.0%} of the patients with replacement")


PROTOCOLS = {
    # LEADER: 8:1:1 by patient, one sample per patient (the last visit).
    "leader": Protocol("leader", SPLIT_RATIOS, shuffle=True, eval_all_visits=False, per_patient=False),
    # GAMENet/SafeDrug main(): the first int(n * 2/3) patients in file order train, the next half of
    # the rest is TEST and the remainder validation; every visit scored, metrics averaged per patient.
    "safedrug": Protocol("safedrug", (2 / 3, 1 / 6, 1 / 6), shuffle=False, eval_all_visits=True, per_patient=True),
}


def get_protocol(name: str | Protocol) -> Protocol:
    if isinstance(name, Protocol):
        return name
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; use one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def split_patients(
    patient_ids: list[str], *, seed: int = 42, ratios: tuple[float, float, float] = SPLIT_RATIOS, protocol: str | Protocol | None = None,
) -> dict[str, list[str]]:
    """Split patients 8:1:1 (by default) into train/val/test, shuffled deterministically by `seed`.

    With `protocol="safedrug"`: no shuffle, train = the first int(n * 2 / 3) patients, test the
    next int((n - train) / 2), validation the rest - the GAMENet/SafeDrug code's exact arithmetic.
    No patient appears in two splits. The order within each split follows the (shuffled) order.
    """
    ids = list(dict.fromkeys(patient_ids))
    if protocol is not None and get_protocol(protocol).name == "safedrug":
        n_train = int(len(ids) * 2 / 3)
        n_test = int((len(ids) - n_train) / 2)
        return {"train": ids[:n_train], "val": ids[n_train + n_test:], "test": ids[n_train:n_train + n_test]}
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise ConfigError(f"split ratios must be three non-negative numbers summing to 1, got {ratios}")
    random.Random(seed).shuffle(ids)
    n_train = int(round(len(ids) * ratios[0]))
    n_val = int(round(len(ids) * ratios[1]))
    return {"train": ids[:n_train], "val": ids[n_train:n_train + n_val], "test": ids[n_train + n_val:]}


def make_samples(ds: Dataset, patient_ids: Iterable[str], *, all_visits: bool = False) -> list[Sample]:
    """Samples for these patients: the last visit with its history (LEADER), or every visit
    with the visits before it (`all_visits`, the GAMENet/SafeDrug protocol)."""
    by_patient = ds.patients()
    out: list[Sample] = []
    for pid in patient_ids:
        visits = by_patient[pid]
        ends = range(1, len(visits) + 1) if all_visits else [len(visits)]
        out.extend(Sample(pid, tuple(visits[:end])) for end in ends)
    return out


def dataset_splits(
    ds: Dataset, *, seed: int = 42, train_all_visits: bool = False, eval_all_visits: bool | None = None,
    protocol: str | Protocol = "leader",
) -> dict[str, list[Sample]]:
    """train/val/test samples, split by patient.

    Args:
        seed: the split seed (ignored by protocols that split in file order).
        train_all_visits: one training sample per visit (more samples from the same patients;
            helps on small data) instead of one per patient.
        eval_all_visits: score every visit of val/test patients (GAMENet/SafeDrug protocol)
            instead of each patient's last visit (LEADER protocol); None: the protocol's choice.
        protocol: "leader" (8:1:1 seeded, last visit) or "safedrug" (see `PROTOCOLS`).
    """
    proto = get_protocol(protocol)
    all_visits_eval = proto.eval_all_visits if eval_all_visits is None else eval_all_visits
    ids = split_patients(list(ds.patients()), seed=seed, ratios=proto.ratios, protocol=proto)
    return {
        name: make_samples(ds, ids[name], all_visits=train_all_visits if name == "train" else all_visits_eval)
        for name in SPLITS
    }


def check_splits(splits: dict[str, list[Sample]], *, source: str | Path, protocol: str | Protocol = "leader") -> None:
    """Refuse splits too small to train, select or score a model, before any stage runs.

    Raises:
        ValueError: an empty split (validation selects epochs and thresholds; test is the score), or
            fewer than 2 training patients. Names the counts and the fix.
    """
    patients = {k: len({s.patient_id for s in v}) for k, v in splits.items()}
    proto = get_protocol(protocol)
    if patients["train"] < 2 or patients["val"] < 1 or patients["test"] < 1:
        total = sum(patients.values())
        raise ConfigError(
            f"{source}: {total} patient(s) split {patients['train']}/{patients['val']}/{patients['test']} "
            f"(train/val/test, {proto.name} protocol); training needs at least 2 training patients and one each for "
            "validation and test - use a dataset with at least 10 patients"
        )
    if not any(s.target.medications for s in splits["train"]):  # it trained, and scored 0 everywhere
        raise ConfigError(f"{source}: no training visit has a medication: there is nothing to learn or score; check "
                          "the medications column of visits.csv (or the map files of `prepare`)")
