"""`leader-edge predict` end to end on a hand-built bundle: formats, stdin, and every bad input
exits 2 with file/line/column and leaves no output (no temp file either)."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_runtime import HEADER, write_fake_bundle

from leader_edge.cli import main

GOOD = HEADER + (
    "p1,v1,2100-01-01,D1;D2,P1,M1,Private\n"
    "p1,v2,2100-02-01T08:00:00,D1;X9,,,Private\n"
    "p2,v3,2100-01-01,D1;D2;D3,P2,M5,Medicare\n"
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_fake_bundle(tmp_path_factory.mktemp("bundle"))


def _predict(bundle: Path, tmp_path: Path, text: str | bytes, *extra: str):
    src = tmp_path / "visits.csv"
    src.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    out = tmp_path / "out" / "recs.csv"
    result = CliRunner().invoke(main, ["predict", "--bundle", str(bundle), "--input", str(src), "--output", str(out), *extra])
    return result, out


def test_predict_csv_last_visit_per_patient(bundle, tmp_path):
    result, out = _predict(bundle, tmp_path, GOOD)
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0] == "patient_id,visit_id,medications,scores,ddi_warnings,unknown_codes"
    rows = [line.split(",") for line in lines[1:]]
    assert [(r[0], r[1], r[5]) for r in rows] == [("p1", "v2", "1"), ("p2", "v3", "0")]
    assert rows[1][2] == "M6;M5;M4" and rows[1][4] == "M5+M6"  # 3 diagnoses: the three highest cross 0.5
    assert "1 unknown code(s)" in result.output


def test_predict_jsonl_all_visits_top_k_threshold(bundle, tmp_path):
    result, out = _predict(bundle, tmp_path, GOOD, "--format", "jsonl", "--all-visits", "--top-k", "2")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["visit_id"] for r in rows] == ["v1", "v2", "v3"]
    assert all(len(r["medications"]) == 2 and len(r["scores"]) == 6 for r in rows)
    result, out = _predict(bundle, tmp_path, GOOD, "--threshold", "0.99")
    assert [line.split(",")[2] for line in out.read_text().splitlines()[1:]] == ["", ""]


def test_predict_reads_stdin_with_bom_and_writes_stdout(bundle):
    result = CliRunner().invoke(main, ["predict", "--bundle", str(bundle), "--input", "-"], input=b"\xef\xbb\xbf" + GOOD.encode())
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith("patient_id,visit_id")
    assert len(result.stdout.splitlines()) == 3


def test_predict_output_scored_by_evaluate(bundle, tmp_path):
    result, out = _predict(bundle, tmp_path, GOOD)
    assert result.exit_code == 0
    scored = CliRunner().invoke(main, ["evaluate", "--truth", str(tmp_path / "visits.csv"), "--predictions", str(out)])
    assert scored.exit_code == 0, scored.output
    assert "jaccard" in scored.output.lower()


BAD = {
    "missing_column": (HEADER.replace(",procedures", ""), "line 1", "missing column"),
    "extra_column": (HEADER.replace("\n", ",age\n") + "p1,v1,2100-01-01,D1,,,Private,40\n", "column 8", "unexpected column"),
    "empty_file": ("", "line 1", "empty"),
    "header_only": (HEADER, "line 2", "no visits"),
    "non_utf8": ((HEADER + "p1,v1,2100-01-01,D1,,,Priv\xe9\n").encode("latin-1"), "line 2", "UTF-8"),
    "quoted_separator": (HEADER + 'p1,v1,2100-01-01,"D1,D2",,,\n', "line 2, column 'diagnoses'", "contains whitespace or ','"),
    "field_count": (HEADER + "p1,v1,2100-01-01,D1,,\n", "line 2", "6 fields"),
    "duplicate_visit": (HEADER + "p1,v1,2100-01-01,D1,,,\np2,v1,2100-01-01,D1,,,\n", "line 3, column 'visit_id'", "already used on line"),
    "out_of_order": (HEADER + "p1,v1,2100-02-01,D1,,,\np1,v2,2100-01-01,D1,,,\n", "line 3, column 'visit_time'", "earlier"),
    "reappearing_patient": (HEADER + "p1,v1,2100-01-01,D1,,,\np2,v2,2100-01-01,,,,\np1,v3,2100-03-01,,,,\n",
                            "line 4, column 'patient_id'", "reappears"),
    "bad_time": (HEADER + "p1,v1,01/02/2100,D1,,,\n", "line 2, column 'visit_time'", "ISO 8601"),
    "empty_id": (HEADER + ",v1,2100-01-01,D1,,,\n", "line 2, column 'patient_id'", "empty patient_id"),
    "stray_separator": (HEADER + "p1,v1,2100-01-01,D1;;D2,,,\n", "line 2, column 'diagnoses'", "empty element"),
    "long_row": (HEADER + "p1,v1,2100-01-01,\"" + "D1;" * 40_000 + "D1\",,,\n", "line 2", "100,000 characters"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_predict_bad_input_exit_2_without_output(bundle, tmp_path, case):
    text, where, what = BAD[case]
    good_rows = "".join(f"q{i},w{i},2100-01-01,D1,,,\n" for i in range(3))  # valid rows first: no partial output
    if case not in ("missing_column", "extra_column", "empty_file", "header_only"):
        text = text[: len(HEADER)] + (good_rows if isinstance(text, str) else good_rows.encode()) + text[len(HEADER):]
        where = where.replace("line 4", "line 7").replace("line 3", "line 6").replace("line 2", "line 5")
    result, out = _predict(bundle, tmp_path, text)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert where in result.output and what in result.output, result.output
    assert "visits.csv" in result.output and "Fix:" in result.output
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_predict_missing_input_and_bad_bundle_exit_2(bundle, tmp_path):
    result = CliRunner().invoke(main, ["predict", "--bundle", str(bundle), "--input", str(tmp_path / "nope.csv")])
    assert result.exit_code == 2 and "no such file" in result.output
    result = CliRunner().invoke(main, ["predict", "--bundle", str(tmp_path), "--input", "-"], input=GOOD)
    assert result.exit_code == 2 and "not a leader-edge bundle" in result.output
