"""`train` and `evaluate --run` on bad options, damaged run records and empty labels: each named
(file, field, fix), exit 2, no traceback, nothing of a finished run replaced (adversarial test findings)."""

import json
import logging
import shutil

import pytest
from click.testing import CliRunner

from leader_edge.cli import main
from leader_edge.data.dataset import write_dataset
from leader_edge.data.synth import synth_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(synth_dataset(patients=40, seed=3), tmp_path_factory.mktemp("d") / "synth", source="synth")


def _train(*args):
    return CliRunner().invoke(main, ["train", "--teacher", "tiny", "--epochs", "1", "--student-epochs", "1", *map(str, args)])


def _refused(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (TypeError, AttributeError)), result.output
    for w in words:
        assert w in result.output, (w, result.output)


@pytest.mark.parametrize("table, line, words", [
    ("teacher", 'lora_r = "eight"', "[teacher] TeacherConfig.lora_r='eight' is not an int"),
    ("teacher", "lora_r = 8.5", "TeacherConfig.lora_r=8.5 is not an int"),
    ("student", 'dim = "big"', "[student] DistillConfig.dim='big' is not an int"),
    ("teacher", "lora_layers = 1.5", "TeacherConfig.lora_layers=1.5; use a layer count"),
    ("teacher", 'backbone_layers = "big"', "TeacherConfig.backbone_layers='big'; use a layer count"),
    ("teacher", 'lora_targets = "q_proj"', "use a list of module names"),
])
def test_train_config_of_the_wrong_type_named_with_its_file(data, tmp_path, table, line, words):
    config = tmp_path / "run.toml"
    config.write_text(f"[{table}]\n{line}\n")
    result = _train("--data", data, "--out", tmp_path / "r", "--config", config)
    _refused(result, str(config), words)
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_train_refuses_too_many_seeds_and_a_teacher_without_a_tokenizer(data, tmp_path):
    _refused(_train("--data", data, "--out", tmp_path / "r", "--seeds", "101"), "1<=x<=100")
    import transformers

    transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path / "cfg")
    result = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(tmp_path / "r2"), "--teacher", str(tmp_path / "cfg")])
    _refused(result, "no tokenizer could be loaded", "serves `train --dry-run` only")
    assert not (tmp_path / "r2").exists()  # named before run.json and teacher/ were written


def test_train_never_replaces_the_record_of_another_run(data, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "run.json").write_text("garbage")
    _refused(_train("--data", data, "--out", run), "run.json is damaged")
    (run / "run.json").write_text(json.dumps({"data": str(data.resolve()), "seed": 42, "protocol": "leader", "seeds": [42]}))
    before = (run / "run.json").read_text()
    _refused(_train("--data", data, "--out", run, "--seed", "7"), "holds a run of another seed (42 there, 7 here)")
    assert (run / "run.json").read_text() == before  # a refused command replaced the run's record


def test_train_refuses_a_dataset_without_any_medication(tmp_path):
    ds = synth_dataset(patients=40, seed=3)
    from dataclasses import replace

    ds.visits = [replace(v, medications=()) for v in ds.visits]
    data = write_dataset(ds, tmp_path / "nomeds", source="synth")
    _refused(_train("--data", data, "--out", tmp_path / "r"), "no training visit has a medication")


def test_evaluate_run_with_a_damaged_run_json_is_named(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"data": 5}))
    result = CliRunner().invoke(main, ["evaluate", "--run", str(run)])
    _refused(result, "run.json is damaged (data not as `train` writes it)")


def test_dataset_without_ddi_or_codes_is_said(data, tmp_path, caplog):
    from leader_edge.data.dataset import load_dataset

    copy = tmp_path / "d"
    shutil.copytree(data, copy)
    (copy / "ddi.csv").unlink()
    (copy / "codes.csv").unlink()
    with caplog.at_level(logging.WARNING):
        load_dataset(copy)
    assert "has no ddi.csv: no interaction is known, so every DDI rate reads 0" in caplog.text
    assert "has no codes.csv" in caplog.text


def test_train_refuses_a_run_directory_another_train_holds(data, tmp_path):
    """Two trains into one --out mixed their stages ("frozen-state cache is damaged")."""
    from filelock import FileLock

    run = tmp_path / "r"
    run.mkdir()
    with FileLock(str(run / ".train.lock")):  # as the other train holds it
        _refused(_train("--data", data, "--out", run), "is being written by another `leader-edge train`")
    assert not (run / "run.json").exists()


def test_train_out_that_is_a_dataset_is_refused(data):
    _refused(_train("--data", data, "--out", data), "is a dataset directory (it holds dataset.json)")
    assert not (data / "run.json").exists() and not (data / ".train.lock").exists()


def test_train_reuses_a_finished_teacher_without_loading_it(data, tmp_path):
    """--stage all over a finished teacher trains the students only: the early check of --teacher
    must not refuse a teacher it will not load (a config.json alone, here)."""
    import transformers

    run = tmp_path / "r"
    assert _train("--data", data, "--out", run).exit_code == 0
    transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path / "cfg")
    result = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(run), "--teacher", str(tmp_path / "cfg"),
                                       "--student-epochs", "1"])
    assert result.exit_code == 0 and "reusing the finished teacher stage" in result.output, result.output
