"""The CLI's shared rules: environment fallbacks for every option, and which errors are shown without a traceback."""

from click.testing import CliRunner

from leader_edge.cli import main


def test_every_option_reads_leader_edge_command_option_from_the_environment(tmp_path):
    out = tmp_path / "synth"
    env = {"LEADER_EDGE_SYNTH_PATIENTS": "12", "LEADER_EDGE_SYNTH_SEED": "3"}
    result = CliRunner().invoke(main, ["synth", "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    from leader_edge.dataset import load_dataset

    assert len(load_dataset(out).patients()) == 12
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "s2")], env={"LEADER_EDGE_SYNTH_PATIENTS": "0"})
    assert result.exit_code == 2 and "patients" in result.output.lower()  # the fallback is validated like the flag
