"""Prompt building: LEADER's template without the public release's defects."""

from datetime import datetime

import pytest

from leader_edge.data.dataset import Dataset, Visit
from leader_edge.data.splits import Sample
from leader_edge.train.prompts import build_prompt, prompt_parts


def _visit(i: int, diag, proc, meds) -> Visit:
    return Visit("p1", f"v{i}", datetime(2100, 1, i), tuple(diag), tuple(proc), tuple(meds))


@pytest.fixture
def ds() -> Dataset:
    names = {
        "diagnosis": {"D1": "Hypertension", "D2": "Asthma", "D3": "Sepsis", "D4": "Anemia", "D5": "Gout"},
        "procedure": {"P1": "Intubation", "P2": "Dialysis"},
        "medication": {"M1": "diuretic agents", "M2": "asthma agents"},
    }
    visits = [
        _visit(1, ["D2", "D1"], ["P1"], ["M2", "M1"]),
        _visit(2, ["D3"], [], ["M1"]),
        _visit(3, ["D4"], ["P2"], ["M9"]),
        _visit(4, ["D5", "D9"], ["P1"], ["M1"]),
    ]
    return Dataset(visits=visits, names=names)


def _sample(ds: Dataset, n: int) -> Sample:
    return Sample("p1", tuple(ds.visits[:n]))


def test_prompt_template_and_code_order(ds):
    text = build_prompt(ds, _sample(ds, 2))
    assert text == (
        "The patient has 2 times ICU visits. \n "
        "In 1 visit, the patient had diagnosis: Hypertension, Asthma; procedures: Intubation. "
        "The patient was prescribed drugs: diuretic agents, asthma agents. \n "
        "In this visit, he has diagnosis: Sepsis; procedures: none. Then, the patient should be prescribed: "
    )


def test_prompt_history_visits_show_their_own_codes(ds):
    text = build_prompt(ds, _sample(ds, 4), max_history=2)
    # visit 1 is beyond a 2-visit history; each kept visit carries its own diagnoses
    assert "In 1 visit" not in text
    assert "In 2 visit, the patient had diagnosis: Sepsis;" in text
    assert "In 3 visit, the patient had diagnosis: Anemia;" in text
    assert text.index("In 2 visit") < text.index("In 3 visit") < text.index("In this visit")
    assert "In this visit, he has diagnosis: Gout, D9;" in text


def test_prompt_code_without_name_appears_as_code(ds):
    text = build_prompt(ds, _sample(ds, 4))
    assert "D9" in text  # diagnosis without a name
    assert "prescribed drugs: M9." in text  # medication without a name


def test_prompt_truncation_drops_oldest_history_first(ds):
    full = build_prompt(ds, _sample(ds, 4), max_history=3)
    words = lambda s: len(s.split())  # noqa: E731 - a stand-in tokenizer
    budget = words(full) - 1
    text = build_prompt(ds, _sample(ds, 4), max_history=3, max_tokens=budget, count_tokens=words)
    assert "In 1 visit" not in text and "In 2 visit" in text and "In 3 visit" in text
    assert text.endswith("Then, the patient should be prescribed: ")


def test_prompt_truncation_never_drops_the_current_visit(ds):
    text = build_prompt(ds, _sample(ds, 4), max_tokens=1, count_tokens=lambda s: len(s.split()))
    _, _, current = prompt_parts(ds, _sample(ds, 4))
    assert text.endswith(current) and "visit, the patient had" not in text
    assert text.startswith("The patient has 4 times ICU visits.")


def test_prompt_refuses_budget_without_counter(ds):
    with pytest.raises(ValueError, match="count_tokens"):
        build_prompt(ds, _sample(ds, 2), max_tokens=10)
