"""Progress bars: drawn on a terminal with rate and ETA, silent elsewhere, with --quiet or on other ranks."""

import io
import sys

from click.testing import CliRunner

from leader_edge.progress import QUIET_ENV, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _draw(monkeypatch, **kwargs) -> str:
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with progress(1000, desc="predict", unit="row", **kwargs) as bar:
        for _ in range(4):
            bar.update(250)
        bar.refresh()
    return term.getvalue()


def test_progress_on_a_terminal_shows_count_rate_and_eta(monkeypatch):
    monkeypatch.delenv(QUIET_ENV, raising=False)
    out = _draw(monkeypatch)
    assert "predict" in out and "1.00k/1.00k" in out and "row/s" in out and "<" in out  # "<" separates elapsed and ETA


def test_progress_is_silent_off_a_terminal_with_quiet_and_on_other_ranks(monkeypatch):
    monkeypatch.delenv(QUIET_ENV, raising=False)
    pipe = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", pipe)
    with progress(10, desc="x") as bar:
        bar.update(10)
    assert pipe.getvalue() == ""
    assert _draw(monkeypatch, enabled=False) == ""
    monkeypatch.setenv(QUIET_ENV, "1")
    assert _draw(monkeypatch) == ""


def test_cli_quiet_flag_switches_bars_off_for_the_command(monkeypatch):
    import os

    from leader_edge.cli import main

    monkeypatch.setenv(QUIET_ENV, "0")  # recorded, so the value the CLI sets is undone after the test
    result = CliRunner().invoke(main, ["--quiet", "synth", "--help"])
    assert result.exit_code == 0, result.output
    assert os.environ.get(QUIET_ENV) == "1"


def test_predict_shows_bytes_read_of_its_input_on_a_terminal(monkeypatch, tmp_path):
    """`predict` draws its bar on stderr (a file input: bytes with a total, so an ETA), and the
    recommendations it writes are the same with or without the bar."""
    from pathlib import Path

    sys.path.insert(0, str(next(Path(__file__).parent.rglob("test_runtime.py")).parent))  # its fake bundle
    from test_runtime import HEADER, write_fake_bundle

    from leader_edge.bedside.predict_file import predict_file
    from leader_edge.bedside.runtime import Bundle

    monkeypatch.delenv(QUIET_ENV, raising=False)
    bundle = Bundle.load(write_fake_bundle(tmp_path / "b"))
    visits = tmp_path / "v.csv"
    visits.write_text(HEADER + "p1,v1,2100-01-01,D1,,,Private\np2,v2,2100-01-01,D2,,,Private\n")
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    predict_file(bundle, str(visits), str(tmp_path / "a.csv"))
    assert "predict" in term.getvalue() and "B/s" in term.getvalue()
    monkeypatch.setenv(QUIET_ENV, "1")
    predict_file(bundle, str(visits), str(tmp_path / "b.csv"))
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
