"""The CLI's shared rules: environment fallbacks for every option, and which errors are shown without a traceback."""

from click.testing import CliRunner

from leader_edge.cli import main


def test_every_option_reads_leader_edge_command_option_from_the_environment(tmp_path):
    out = tmp_path / "synth"
    env = {"LEADER_EDGE_SYNTH_PATIENTS": "12", "LEADER_EDGE_SYNTH_SEED": "3"}
    result = CliRunner().invoke(main, ["synth", "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    from leader_edge.data.dataset import load_dataset

    assert len(load_dataset(out).patients()) == 12
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "s2")], env={"LEADER_EDGE_SYNTH_PATIENTS": "0"})
    assert result.exit_code == 2 and "patients" in result.output.lower()  # the fallback is validated like the flag



def test_cli_shows_own_errors_without_a_traceback_and_bugs_with_one(monkeypatch, tmp_path):
    import leader_edge.data.synth
    from leader_edge.errors import ConfigError

    def user_mistake(*args, **kwargs):
        raise ConfigError("patients=3 is too few; pass --patients 10 or more")

    def bug(*args, **kwargs):
        raise ValueError("operands could not be broadcast together with shapes (3,) (4,)")

    monkeypatch.setattr(leader_edge.data.synth, "generate_cohort", user_mistake)
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "pass --patients 10 or more" in result.output and result.exception.__class__ is SystemExit
    monkeypatch.setattr(leader_edge.data.synth, "generate_cohort", bug)
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)  # a bug keeps its traceback
