"""Fault suite, predict part (issue #12): nothing lost, no code dropped silently, clear words.

Every case feeds `leader-edge predict` the exact bad input on the hand-built bundle of
test_runtime.py and asserts the exit code, a message naming the file (line, column) and the fix,
and that no output and no temp file is left beside the output. The kill tests run the CLI as a
subprocess on a 40,000-patient file (~1 s a run)."""

import errno
import gzip
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_runtime import HEADER, write_fake_bundle

from leader_edge.bedside import predict_file as runtime  # the output half of the runtime (split from runtime.py)
from leader_edge.cli import main
from leader_edge.files import temp_tag

GOOD = HEADER + "p1,v1,2100-01-01,D1;D2,P1,M1,Private\np1,v2,2100-02-01,D1;X9,,,Private\np2,v3,2100-01-01,D1;D2;D3,P2,M5,\n"
ROWS = "".join(f"q{i},w{i},2100-01-01,D1,,,\n" for i in range(3))  # valid rows before a bad one: lines 2-4


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_fake_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


def _predict(bundle: Path, tmp_path: Path, data: str | bytes | None, *extra: str, output: Path | None = None):
    src = tmp_path / "visits.csv"
    if data is not None:
        src.write_bytes(data.encode() if isinstance(data, str) else data)
    out = output or tmp_path / "out" / "recs.csv"
    args = ["predict", "--bundle", str(bundle), "--input", str(src), "--output", str(out), *extra]
    return CliRunner().invoke(main, args), out


def _assert_refused(result, out: Path, *texts: str, code: int = 2) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and "Fix:" in result.output, result.output
    for text in texts:
        assert text in result.output, (text, result.output)
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == [], list(out.parent.iterdir())


# ---------------------------------------------------------------------------------------------
# Clear words: each bad input exactly as the issue found it


def _latin1_on_line_60() -> bytes:
    rows = "".join(f"p{i},v{i},2100-01-01,D1,,,Private\n" for i in range(58))  # lines 2-59
    return (HEADER + rows + "p99,v99,2100-01-01,D1,,,Priv\xe9\n").encode("latin-1")


BAD = {
    "utf16_le_bom": ((HEADER + ROWS).encode("utf-16-le"), b"\xff\xfe", "line 1", "UTF-16", "re-save it as UTF-8"),
    "utf16_be_bom": ((HEADER + ROWS).encode("utf-16-be"), b"\xfe\xff", "line 1", "UTF-16", "re-save it as UTF-8"),
    "utf16_no_bom": ((HEADER + ROWS).encode("utf-16-le"), b"", "line 1", "UTF-16 without a byte-order mark", "UTF-8"),
    "gzip": (gzip.compress((HEADER + ROWS).encode()), b"", "line 1", "gzip-compressed", "zcat FILE | leader-edge predict"),
    "latin1_line_60": (_latin1_on_line_60(), b"", "line 60:", "not valid UTF-8 (byte 0xe9", "iconv -f latin1"),
    "nul_patient_id": (HEADER + ROWS + "p\0x,v9,2100-01-01,D1,,,\n", b"", "line 5, column 'patient_id'", "NUL byte", "remove"),
    "nul_visit_id": (HEADER + ROWS + "p9,v\0,2100-01-01,D1,,,\n", b"", "line 5, column 'visit_id'", "NUL byte", "remove"),
    "nul_code": (HEADER + ROWS + "p9,v9,2100-01-01,D1;D\0,,,\n", b"", "line 5, column 'diagnoses'", "NUL byte", "remove"),
    "nul_quoted": (HEADER + ROWS + 'p9,v9,2100-01-01,"D\0",,,\n', b"", "line 5, column 'diagnoses'", "NUL byte", "remove"),
    "formula_equals": (HEADER + ROWS + "=HYPERLINK(1),v9,2100-01-01,D1,,,\n", b"", "line 5, column 'patient_id'",
                       "begins with '='", "begin with a letter or a digit"),
    "formula_plus": (HEADER + ROWS + "p9,+1,2100-01-01,D1,,,\n", b"", "line 5, column 'visit_id'", "with '+'", "letter"),
    "formula_minus": (HEADER + ROWS + "-2+3,v9,2100-01-01,D1,,,\n", b"", "line 5, column 'patient_id'", "with '-'", "letter"),
    "formula_at": (HEADER + ROWS + "p9,@SUM(A1),2100-01-01,D1,,,\n", b"", "line 5, column 'visit_id'", "with '@'", "letter"),
    "visit_of_50000_codes": (HEADER + ROWS + "p9,v9,2100-01-01," + ";".join(["D1"] * 50_000) + ",,,\n", b"", "line 5:",
                             "longer than the limit of 100,000 characters", "shorten this row's code lists"),
    "unclosed_quote": (HEADER + ROWS + 'p9,v9,2100-01-01,"D1,,,\n' + "".join(f"r{i},s{i},2100-01-01,D1,,,\n" for i in range(5000)),
                       b"", "line 5:", "a '\"' quote is not closed", "close the '\"' quote opened on line 5"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_faults_predict_bad_input_named_with_fix(bundle, tmp_path, case):
    data, bom, where, what, fix = BAD[case]
    data = bom + (data if isinstance(data, bytes) else data.encode())
    result, out = _predict(bundle, tmp_path, data)
    _assert_refused(result, out, "visits.csv", where, what, fix)
    assert "unclosed" not in result.output or case == "unclosed_quote"
    assert "latin1" not in result.output or case == "latin1_line_60"


@pytest.mark.parametrize("options, words", [
    (("--threshold", "nan"), "'nan' is not a finite number"),  # was: every recommendation empty, exit 0
    (("--threshold", "inf"), "not in the range"),
    (("--top-k", "3", "--threshold", "0.9"), "--top-k and --threshold are exclusive"),  # was: the threshold ignored
])
def test_faults_predict_options_that_would_silently_change_the_answer_refused(bundle, tmp_path, options, words):
    result, out = _predict(bundle, tmp_path, GOOD, *options)
    assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output, result.output
    assert not out.exists()


def test_faults_predict_writes_through_a_link_and_into_a_fifo(bundle, tmp_path):
    """--out on a link replaced the link with a file (the target kept its old data); on a device it
    replaced the device (--out /dev/full: exit 0)."""
    expected, _ = _predict(bundle, tmp_path, GOOD, output=tmp_path / "plain.csv")
    assert expected.exit_code == 0, expected.output
    want = (tmp_path / "plain.csv").read_text()
    target = tmp_path / "target.csv"
    target.write_text("old")
    (tmp_path / "link.csv").symlink_to(target.name)
    result, _ = _predict(bundle, tmp_path, GOOD, output=tmp_path / "link.csv")
    assert result.exit_code == 0 and (tmp_path / "link.csv").is_symlink() and target.read_text() == want
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = __import__("threading").Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    result, _ = _predict(bundle, tmp_path, GOOD, output=fifo)
    reader.join(30)
    assert result.exit_code == 0 and got == [want] and os.path.exists(fifo) and not os.path.isfile(fifo)


def test_faults_predict_out_dev_stdout_into_a_pipe(bundle, tmp_path):
    """/dev/stdout is a link to /proc/self/fd/1, which resolves to "pipe:[N]", no path: written in place."""
    src = tmp_path / "visits.csv"
    src.write_text(GOOD)
    p = subprocess.run([sys.executable, "-m", "leader_edge", "predict", "--bundle", str(bundle), "--input", str(src),
                        "--out", "/dev/stdout"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("patient_id,visit_id,medications"), p.stderr
    assert len(p.stdout.splitlines()) == 1 + 2  # every patient's line came through the pipe (p1, p2)


def test_faults_predict_unseen_profile_values_counted(bundle, tmp_path):
    """An insurance the bundle never saw was read as the field's unknown value without a word."""
    data = HEADER + "p1,v1,2100-01-01,D1,,,Gold\np2,v2,2100-01-01,D1,,,Private\np3,v3,2100-01-01,D1,,,\n"
    result, out = _predict(bundle, tmp_path, data)
    assert result.exit_code == 0, result.output
    assert "1 profile value(s) the bundle never saw read as unknown (e.g. insurance='Gold')" in result.output
    result, out = _predict(bundle, tmp_path, GOOD)
    assert result.exit_code == 0 and "never saw" not in result.output, result.output


def test_faults_predict_ordinary_ids_written_unchanged(bundle, tmp_path):
    """Ids with '-', '=', '@' or '+' inside (not first) are ordinary: written as they are."""
    result, out = _predict(bundle, tmp_path, HEADER + "p-1,v=1,2100-01-01,D1,,,\nid@2,v+2,2100-01-01,D1,,,\n")
    assert result.exit_code == 0, result.output
    assert [line.split(",")[:2] for line in out.read_text().splitlines()[1:]] == [["p-1", "v=1"], ["id@2", "v+2"]]


# ---------------------------------------------------------------------------------------------
# No code dropped silently


def test_faults_predict_codes_beyond_the_limit_counted_and_reported(tmp_path):
    capped = write_fake_bundle(tmp_path / "capped", max_codes=2)  # reads the first 2 codes per visit and kind
    data = HEADER + "p1,v1,2100-01-01,D1;D2;D3;D4;D5,P1,M1,\np1,v2,2100-02-01,D1;X9,,,\np2,v3,2100-01-01,D1;D2,P1;P2,,\n"
    result, out = _predict(capped, tmp_path, data)
    assert result.exit_code == 0, result.output
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    assert [(r[1], r[5]) for r in rows] == [("v2", "4"), ("v3", "0")]  # v2: X9 unknown + D3, D4, D5 of v1's history
    assert "1 unknown code(s) ignored in 1 visit(s)" in result.output
    assert "3 code(s) beyond the model's limit of 2 per visit and kind ignored in 1 visit(s)" in result.output
    result, out = _predict(capped, tmp_path, data, "--all-visits", "--format", "jsonl")
    assert out.read_text().count('"unknown_codes":3') == 1  # v1 alone: its own 3 codes beyond the limit
    assert "6 code(s) beyond the model's limit of 2 per visit and kind ignored in 2 visit(s)" in result.output


def test_faults_predict_mostly_unknown_codes_refused_unless_allowed(bundle, tmp_path):
    """MIMIC-IV codes (ICD9_/ICD10_ prefixed) scored by a bundle of another vocabulary: 100% unknown."""
    data = HEADER + "10000032,22595853,2180-05-06,ICD9_5723;ICD9_78959;ICD10_K7031,ICD9_5491,,\n"
    result, out = _predict(bundle, tmp_path, data)
    _assert_refused(result, out, "visits.csv:", "4 of the 4 codes written in the visits the model reads (100%) are not in the vocabulary",
                    "--allow-unknown")
    result, out = _predict(bundle, tmp_path, data, "--allow-unknown")
    assert result.exit_code == 0 and out.read_text().splitlines()[1].endswith(",4"), result.output
    assert "warning: 100% of the codes are unknown" in result.output
    result, out = _predict(bundle, tmp_path, GOOD)  # 1 unknown of 9 read: no refusal, no warning
    assert result.exit_code == 0 and "warning" not in result.output, result.output


# ---------------------------------------------------------------------------------------------
# Nothing lost: the input, the output, the disk


@pytest.mark.parametrize("how", ["same", "dot_slash", "symlink", "hardlink"])
def test_faults_predict_output_that_is_the_input_refused(bundle, tmp_path, how, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("visits.csv").write_text(GOOD)
    output = {"same": "visits.csv", "dot_slash": "./visits.csv", "symlink": "link.csv", "hardlink": "hard.csv"}[how]
    if how == "symlink":
        os.symlink("visits.csv", "link.csv")
    if how == "hardlink":
        os.link("visits.csv", "hard.csv")
    result = CliRunner().invoke(main, ["predict", "--bundle", str(bundle), "--input", "visits.csv", "--output", output])
    assert result.exit_code == 2, result.output
    assert "is the --input file" in result.output and "Fix: pass another --out" in result.output
    assert Path("visits.csv").read_text() == GOOD
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"visits.csv", output.lstrip("./")})


def test_faults_predict_output_inside_the_bundle_refused(tmp_path):
    d = write_fake_bundle(tmp_path / "b")
    before = sorted(p.name for p in d.iterdir())
    result, out = _predict(d, tmp_path, GOOD, output=d / "manifest.json")
    assert result.exit_code == 2 and "inside the bundle directory" in result.output, result.output
    assert sorted(p.name for p in d.iterdir()) == before


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_faults_predict_output_mode_follows_umask(bundle, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        result, out = _predict(bundle, tmp_path, GOOD)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == mode
    out.chmod(0o600)  # a replaced output keeps the mode it had
    result, out = _predict(bundle, tmp_path, GOOD)
    assert out.stat().st_mode & 0o777 == 0o600


class _FullDisk(io.RawIOBase):
    """The raw temp file on a full disk: every write raises ENOSPC. Under a BufferedWriter, as
    `os.fdopen` gives, a small output fails at the flush and a large one at the write."""

    def __init__(self, f) -> None:
        self.f = f

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        self.f.close()
        super().close()


@pytest.mark.parametrize("rows", [3, 3000])
def test_faults_predict_disk_full_names_the_output(bundle, tmp_path, monkeypatch, rows):
    real = os.fdopen
    monkeypatch.setattr(runtime.os, "fdopen", lambda fd, *a, **k: io.BufferedWriter(_FullDisk(real(fd, *a, **k))))
    data = HEADER + "".join(f"p{i},v{i},2100-01-01,D1;D2,P1,M1,Private\n" for i in range(rows))
    result, out = _predict(bundle, tmp_path, data)
    _assert_refused(result, out, f"{out}: cannot be written: No space left on device (ENOSPC)",
                    f"free space on the disk that holds {out.parent}")
    result = CliRunner().invoke(main, ["predict", "--bundle", str(bundle), "--input", str(tmp_path / "visits.csv")])
    assert result.exit_code == 2 and "cannot hold the recommendations before they go to standard output" in result.output


# ---------------------------------------------------------------------------------------------
# Kill and rerun


def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".")) if directory.exists() else []


def _start(bundle: Path, src: str, out: Path, **kw) -> subprocess.Popen:
    args = [sys.executable, "-m", "leader_edge", "predict", "--bundle", str(bundle), "--input", src, "--output", str(out)]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def _wait_for_temp(p: subprocess.Popen, directory: Path, min_bytes: int) -> Path:
    """The temp file of run `p` once it holds `min_bytes` (the run is then mid-file)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for name in _temps(directory):
            if f".{p.pid}." in name and (directory / name).stat().st_size >= min_bytes:
                return directory / name
        assert p.poll() is None, "predict ended before it could be killed: " + p.stderr.read().decode()
        time.sleep(0.002)
    raise AssertionError("no temp file appeared")


def test_faults_predict_killed_runs_leave_nothing_and_rerun_gives_the_same_bytes(bundle, tmp_path):
    rows = "".join(f"p{i},v{i}_{j},2100-01-0{j + 1},D{i % 5 + 1};D{(i + j) % 5 + 1},P{j % 2 + 1},M{i % 6 + 1},Private\n"
                   for i in range(40_000) for j in range(1 + i % 2))
    src = tmp_path / "visits.csv"
    src.write_text(HEADER + rows)
    reference = tmp_path / "reference.csv"
    args = ["predict", "--bundle", str(bundle), "--input", str(src), "--output", str(reference)]
    assert CliRunner().invoke(main, args).exit_code == 0
    out = tmp_path / "out" / "recs.csv"
    out.parent.mkdir()
    live = out.parent / f".recs.csv.{temp_tag()}live.tmp"  # a temp file of a running process (this one)
    live.write_bytes(b"partial")

    p = _start(bundle, str(src), out)  # SIGKILL cannot be caught: its temp file stays ...
    stale = _wait_for_temp(p, out.parent, 100_000)
    p.kill()
    assert p.wait() == -signal.SIGKILL and stale.exists()

    p = _start(bundle, str(src), out)  # ... until the next run, which removes it; SIGTERM removes its own
    _wait_for_temp(p, out.parent, 100_000)
    p.send_signal(signal.SIGTERM)
    stderr = p.stderr.read().decode()
    assert p.wait() == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM; nothing written" in stderr and f"removed {stale}" in stderr
    assert _temps(out.parent) == [live.name] and not out.exists()

    p = _start(bundle, str(src), out)
    assert p.wait() == 0, p.stderr.read().decode()
    assert out.read_bytes() == reference.read_bytes()
    assert _temps(out.parent) == [live.name]  # another live run's temp file is left alone


def test_faults_predict_sigint_while_reading_stdin_leaves_nothing(bundle, tmp_path):
    out = tmp_path / "out" / "recs.csv"
    p = _start(bundle, "-", out, stdin=subprocess.PIPE)
    p.stdin.write((HEADER + ROWS).encode())
    p.stdin.flush()  # the pipe stays open: predict waits for more rows
    _wait_for_temp(p, out.parent, 0)
    p.send_signal(signal.SIGINT)
    assert p.wait() == 128 + signal.SIGINT
    assert "stopped by SIGINT" in p.stderr.read().decode()
    p.stdin.close()
    assert _temps(out.parent) == [] and not out.exists()
