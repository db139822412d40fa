"""Verbalise a sample as LEADER's teacher prompt (torch-free).

LEADER's template (arXiv 2402.02803, see LEADER-NOTES):

    The patient has <N> times ICU visits. \\n <HISTORY> In this visit, he has diagnosis: <DIAG>;
    procedures: <PROC>. Then, the patient should be prescribed:

with one history entry per earlier visit (at most `max_history`, the most recent ones):

    In <k> visit, the patient had diagnosis: <DIAG>; procedures: <PROC>. The patient was
    prescribed drugs: <MEDS>. \\n

Differences from the public release, on purpose (its defects):
- each history visit shows its OWN codes (the release repeats the current visit's diagnoses);
- when the prompt is too long the OLDEST history visit goes first, and the current visit is never
  dropped (the release keeps the first 2048 tokens, which can cut the current visit);
- codes are sorted (by code) so the same visit always reads the same way;
- a code without a name appears as its code instead of vanishing.
"""

from __future__ import annotations

from typing import Callable

from leader_edge.data.dataset import Dataset, Visit
from leader_edge.data.splits import Sample
from leader_edge.errors import ConfigError

# LEADER keeps at most the 3 previous visits.
MAX_HISTORY = 3
HEADER = "The patient has {n} times ICU visits. \n "
HISTORY = (
    "In {k} visit, the patient had diagnosis: {diag}; procedures: {proc}. "
    "The patient was prescribed drugs: {meds}. \n "
)
CURRENT = "In this visit, he has diagnosis: {diag}; procedures: {proc}. Then, the patient should be prescribed: "


def verbalise_codes(ds: Dataset, kind: str, codes: tuple[str, ...] | list[str]) -> str:
    """Names of the codes, sorted by code and de-duplicated, joined by ", " ("none" when empty)."""
    names = [ds.name(kind, c) for c in sorted(set(codes))]
    return ", ".join(names) if names else "none"


def _history_text(ds: Dataset, visit: Visit, k: int) -> str:
    return HISTORY.format(
        k=k,
        diag=verbalise_codes(ds, "diagnosis", visit.diagnoses),
        proc=verbalise_codes(ds, "procedure", visit.procedures),
        meds=verbalise_codes(ds, "medication", visit.medications),
    )


def prompt_parts(ds: Dataset, sample: Sample, *, max_history: int = MAX_HISTORY) -> tuple[str, list[str], str]:
    """(header, history entries oldest first, current visit) of a sample's prompt.

    History entries keep the visit's number among the patient's visits (1 = first), so dropping
    old entries does not renumber the rest.
    """
    if max_history < 0:
        raise ConfigError(f"max_history={max_history} must be >= 0")
    n = len(sample.visits)
    first = max(0, n - 1 - max_history)
    history = [_history_text(ds, v, k + 1) for k, v in enumerate(sample.history) if k >= first]
    cur = sample.target
    current = CURRENT.format(
        diag=verbalise_codes(ds, "diagnosis", cur.diagnoses),
        proc=verbalise_codes(ds, "procedure", cur.procedures),
    )
    return HEADER.format(n=n), history, current


def build_prompt(
    ds: Dataset,
    sample: Sample,
    *,
    max_history: int = MAX_HISTORY,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> str:
    """The sample's prompt, dropping the oldest history visits until it fits `max_tokens`.

    Args:
        ds: the dataset (code names).
        sample: `sample.visits[-1]` is the current visit.
        max_history: at most this many previous visits (LEADER: 3).
        max_tokens: token budget for the whole prompt; None means no limit. The current visit is
            never dropped, so a prompt whose current visit alone exceeds the budget stays longer.
        count_tokens: text -> number of tokens (required with `max_tokens`).
    """
    header, history, current = prompt_parts(ds, sample, max_history=max_history)
    if max_tokens is None:
        return header + "".join(history) + current
    if count_tokens is None:
        raise ValueError("build_prompt(max_tokens=...) needs count_tokens, e.g. lambda s: len(tokenizer.encode(s))")
    while True:
        text = header + "".join(history) + current
        if not history or count_tokens(text) <= max_tokens:
            return text
        history = history[1:]  # the oldest goes first; the current visit always stays
