"""The student stage end to end on a tiny synthetic dataset with fabricated teacher features."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from leader_edge.data.dataset import load_dataset, write_dataset
from leader_edge.data.splits import dataset_splits
from leader_edge.bedside.recs import read_predictions
from leader_edge.files import sha256
from leader_edge.data.synth import synth_dataset
from leader_edge.train.distill import DistillConfig, batches, run_student_stage, trim
from leader_edge.errors import StateError
from leader_edge.train.stage_files import load_student, load_teacher_features
from leader_edge.train.teacher_data import sample_key

HIDDEN = 16
FAST = DistillConfig(epochs=2, patience=1, batch_size=32, timing_patients=3, code_init="input")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(synth_dataset(patients=120, seed=3), tmp_path_factory.mktemp("d") / "data", source="synth")


def fabricate_teacher(data, run, *, seed=42, drop=None):
    """RUN/teacher/features.safetensors with the contract's keys and random rows."""
    ds = load_dataset(data)
    splits = dataset_splits(ds, seed=seed, train_all_visits=True)
    rng = np.random.default_rng(0)
    keys = {k: [sample_key(s) for s in v if sample_key(s) != drop] for k, v in splits.items()}
    tensors = {k: (rng.normal(size=(len(v), HIDDEN)) * 5 + 3).astype(np.float32) for k, v in keys.items()}
    (run / "teacher").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(run / "teacher" / "features.safetensors"), metadata={"keys": json.dumps(keys), "hidden_size": str(HIDDEN)})
    (run / "teacher" / "config.json").write_text(json.dumps({"teacher": {"teacher": "tiny"}}))  # code_init's backbone
    digest = sha256(run / "teacher" / "features.safetensors")
    (run / "teacher" / "metrics.json").write_text(json.dumps({"files": {"features.safetensors": digest}}))
    return splits


def test_run_student_stage_writes_a_loadable_student_and_reproduces(data, tmp_path):
    results = []
    for run in (tmp_path / "a", tmp_path / "b"):
        fabricate_teacher(data, run)
        results.append(run_student_stage(data, run, config=FAST))
    out = tmp_path / "a" / "student"
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "metrics.json", "history.json", "predictions-test.csv"}
    assert results[0]["test"] == results[1]["test"] and results[0]["threshold"] == results[1]["threshold"]
    history = json.loads((out / "history.json").read_text())
    # epoch 0 = the counting prior alone (a selection candidate), then the trained epochs
    assert history[0]["epoch"] == 0 and "train_loss" not in history[0]
    assert history[1]["epoch"] == 1 and history[1]["train_mse"] > 0 and history[1]["train_nce"] > 0
    assert results[0]["n_params"] < results[0]["n_params_training"]  # the projection is not shipped
    model, encoder, threshold = load_student(out)
    assert threshold == results[0]["threshold"] and model.config.teacher_dim == HIDDEN
    preds = read_predictions(out / "predictions-test.csv")
    assert len(preds) == results[0]["test_groups"]["overall"]["n"][0]
    assert set(results[0]["test"]) == {"jaccard", "prauc", "f1", "ddi_rate", "n_med"}
    assert (tmp_path / "a" / "teacher" / "code-embeddings.safetensors").is_file()  # teacher name embeddings
    assert model.config.wide == "max" and model.config.prior == "frequency" and model.config.prior_rule == "stack"
    assert model.prior_table.sum() > 0 and model.prior_mix.abs().sum() > 0  # counting tables and the fitted rule mix


def test_run_student_stage_without_distillation_needs_no_teacher(data, tmp_path):
    result = run_student_stage(data, tmp_path, distill=False, config=FAST, epochs=1)
    assert result["epochs_run"] == 1 and result["model"] == "student-nodistill"
    history = json.loads((tmp_path / "student-nodistill" / "history.json").read_text())
    assert history[-1]["epoch"] == 1 and history[-1]["train_mse"] == 0
    assert not (tmp_path / "teacher").exists()  # label-only: never reads or caches teacher embeddings


def test_run_student_stage_refuses_missing_or_mismatched_features(data, tmp_path):
    with pytest.raises(RuntimeError, match="run the teacher stage first"):
        run_student_stage(data, tmp_path, config=FAST)
    splits = dataset_splits(load_dataset(data), seed=42, train_all_visits=True)
    fabricate_teacher(data, tmp_path, drop=sample_key(splits["train"][0]))
    with pytest.raises(RuntimeError, match="have no teacher feature"):
        run_student_stage(data, tmp_path, config=FAST)
    assert not (tmp_path / "student").exists()


def test_load_teacher_features_orders_rows_by_sample_and_standardises(data, tmp_path):
    splits = fabricate_teacher(data, tmp_path)
    shuffled = {k: v[::-1] for k, v in splits.items()}
    feats = load_teacher_features(tmp_path, splits)
    back = load_teacher_features(tmp_path, shuffled)
    np.testing.assert_allclose(back["train"], feats["train"][::-1], atol=1e-5)
    np.testing.assert_allclose(feats["train"].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(feats["train"].std(0), 1, atol=1e-3)


def test_batches_group_samples_by_visit_count_and_cover_all():
    n_visits = np.array([1, 3, 1, 2, 1, 3, 2, 1])
    out = batches(n_visits, 2, np.random.default_rng(0))
    assert sorted(np.concatenate(out).tolist()) == list(range(8))
    assert all(len(set(n_visits[b])) == 1 for b in out)  # counts 4/2/2: every batch holds one count


def test_trim_cuts_only_padding(data):
    from leader_edge.bedside.encoding import Encoder, KINDS

    ds = load_dataset(data)
    enc = Encoder({k: ds.vocab(k) for k in KINDS}, max_visits=4)
    samples = dataset_splits(ds)["train"]
    batch = enc.encode([s.visits for s in samples])
    single = np.array([i for i, s in enumerate(samples) if len(s.visits) == 1][:3])
    t = trim(batch, single)
    assert t["visit_mask"].shape == (3, 1) and (t["diagnoses"] >= 0).any(-1).all()
    assert torch.equal(torch.from_numpy(t["diagnoses"][:, -1]), torch.from_numpy(batch.diagnoses[single, -1, : t["diagnoses"].shape[2]]))


def test_student_training_seeds_share_the_split_and_land_beside_each_other(data, tmp_path):
    from click.testing import CliRunner

    from leader_edge.cli import main
    from leader_edge.evaluation.report import seed_dirs

    a = run_student_stage(data, tmp_path, distill=False, config=FAST, epochs=1)
    b = run_student_stage(data, tmp_path, distill=False, config=FAST, epochs=1, train_seed=43)
    assert (tmp_path / "student-nodistill.seed-43" / "model.safetensors").is_file()
    assert a["train_seed"] == 42 and b["train_seed"] == 43 and a["protocol"] == b["protocol"] == "leader"
    ids = [[p.visit_id for p in read_predictions(tmp_path / d / "predictions-test.csv")] for d in ("student-nodistill", "student-nodistill.seed-43")]
    assert ids[0] == ids[1]  # the same test patients: the comparison can be paired
    assert a["test"] != b["test"]  # a different initialisation
    assert list(seed_dirs(tmp_path, "student-nodistill", 42)) == [42, 43]
    # the CLI refuses a teacher-less distilled run before training anything, and records seeds/protocol
    r = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--stage", "student",
                                  "--seeds", "2", "--protocol", "safedrug"])
    assert r.exit_code != 0 and "no finished teacher stage" in r.output
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["seeds"] == [42, 43] and run["protocol"] == "safedrug"


@pytest.mark.parametrize("rule", ["mean", "max", "noisy_or", "specificity"])
def test_counting_prior_alone_is_the_frequency_baseline(data, rule):
    from leader_edge.evaluation.baselines import fit_frequency_baseline
    from leader_edge.bedside.encoding import KINDS, Encoder
    from leader_edge.train.distill import predict
    from leader_edge.train.student import PRIOR_RULES, Student, StudentConfig
    from leader_edge.train.student_init import frequency_prior

    ds = load_dataset(data)
    splits = dataset_splits(ds, seed=42, train_all_visits=True)
    train_ids = {s.patient_id for s in splits["train"]}
    enc = Encoder.from_visits({k: ds.vocab(k) for k in KINDS}, [v for v in ds.visits if v.patient_id in train_ids])
    tables, oof = frequency_prior(ds, splits, enc, seed=0)
    assert oof.shape == (len(splits["train"]), enc.n_meds, 1) and np.isfinite(oof).all()
    base, _, _ = fit_frequency_baseline(ds, splits)
    base.set_rule(rule, base.smoothing)
    tables, _ = frequency_prior(ds, splits, enc, seed=0, rule=rule)
    encoded = enc.encode([s.visits for s in splits["test"]])
    want = np.clip(base.predict_proba(splits["test"]), 1e-4, 1 - 1e-4)
    for as_rule in (rule, "stack"):  # the rule alone, and the stack with all weight on it
        model = Student(StudentConfig(enc.n_codes, enc.n_meds, enc.n_profile_ids, enc.med_offset, prior="frequency",
                                      prior_rule=as_rule, wide="none"))
        model.set_prior(tables["table"], tables["weight"], tables["global"], tables["global_weight"])
        with torch.no_grad():
            model.head_weight.zero_()
            model.head_bias.zero_()
            if as_rule == "stack":
                model.prior_mix.copy_(torch.tensor([float(r == rule) for r in PRIOR_RULES]))
        got = predict(model, encoded, torch.device("cpu"))
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_prior_mix_fit_moves_off_the_chosen_rule_only_when_it_helps():
    from leader_edge.train.student_init import fit_prior_mix

    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, 5, 4)).astype(np.float32)
    y = (rng.random((400, 5)) < 1 / (1 + np.exp(-(2 * z[..., 3] - 1)))).astype(np.float32)  # only rule 3 matters
    mix, bias = fit_prior_mix(z, y, chosen=1)
    assert abs(mix[3] - 2) < 0.4 and np.abs(mix[:3]).max() < 0.3 and np.allclose(bias, -1, atol=0.4)
    assert np.array_equal(fit_prior_mix(z, y, chosen=1)[0], mix)  # deterministic


def test_train_refuses_splits_too_small_before_any_stage(tmp_path):
    from click.testing import CliRunner

    from leader_edge.cli import main

    data = write_dataset(synth_dataset(patients=3, seed=1), tmp_path / "d", source="synth")
    r = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--teacher", "tiny"])
    assert r.exit_code == 2 and "at least 10 patients" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "r").exists()  # nothing written


def test_stage_outputs_are_checked_before_reuse(data, tmp_path):
    fabricate_teacher(data, tmp_path)
    (tmp_path / "teacher" / "metrics.json").write_text(json.dumps({"files": {"features.safetensors": "0" * 64}}))
    with pytest.raises(RuntimeError, match="re-run `leader-edge train --stage teacher`"):
        run_student_stage(data, tmp_path, config=FAST)
    run_student_stage(data, tmp_path, distill=False, config=FAST, epochs=1)
    weights = tmp_path / "student-nodistill" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01  # one flipped bit in the weights
    weights.write_bytes(bytes(raw))
    with pytest.raises(RuntimeError, match="--stage student"):
        load_student(tmp_path / "student-nodistill")
    weights.write_bytes(bytes(raw[:-1] + bytes([raw[-1] ^ 0x01])))  # mended
    config = tmp_path / "student-nodistill" / "config.json"
    good = config.read_text()
    config.write_text("{garbled")  # was a JSONDecodeError traceback in `export`
    with pytest.raises(StateError, match=r"config.json does not match the sha256 .*--stage student"):
        load_student(tmp_path / "student-nodistill")
    metrics = tmp_path / "student-nodistill" / "metrics.json"
    metrics.write_text(json.dumps({k: v for k, v in json.loads(metrics.read_text()).items() if k != "files"}))
    with pytest.raises(StateError, match=r"config.json or model.safetensors is damaged \(JSONDecodeError.*--stage student"):
        load_student(tmp_path / "student-nodistill")  # a student from before the digests
    config.write_text(good)
    load_student(tmp_path / "student-nodistill")


def test_frequency_student_is_the_baseline_and_exports_as_a_bundle(data, tmp_path):
    from leader_edge.evaluation.baselines import fit_frequency_baseline
    from leader_edge.export.bundle import export_bundle
    from leader_edge.bedside.runtime import Bundle
    from leader_edge.train.baseline_student import write_frequency_student

    result = write_frequency_student(data, tmp_path, seed=42)
    ds = load_dataset(data)
    splits = dataset_splits(ds, seed=42, train_all_visits=True)
    base, threshold, _ = fit_frequency_baseline(ds, splits)
    assert result["threshold"] == threshold and result["rule"] == base.rule
    model, encoder, t = load_student(tmp_path / "frequency")
    test = [s.visits for s in splits["test"]]
    with torch.no_grad():
        got = model.predict_proba(*(torch.from_numpy(a) for a in encoder.encode(test).inputs().values())).numpy()
    want = np.clip(base.predict_proba(splits["test"]), 1e-4, 1 - 1e-4)
    np.testing.assert_allclose(got, want, atol=2e-6)
    manifest = export_bundle(tmp_path, tmp_path / "bundle", model="frequency")  # counting served like a model
    prob, _ = Bundle.load(tmp_path / "bundle").predict_proba(test)
    np.testing.assert_allclose(prob, want, atol=1e-5)
    assert manifest["threshold"] == threshold


def test_run_config_toml_reaches_teacher_and_student_and_names_bad_fields(tmp_path):
    from pathlib import Path

    from leader_edge.train.distill import DistillConfig
    from leader_edge.train.teacher_config import TeacherConfig, load_run_config

    root = Path(__file__).resolve().parents[2] / "configs"
    for path in sorted(root.glob("*.toml")):  # every shipped config builds both stage configs
        teacher, student = load_run_config(path)
        TeacherConfig.from_dict(teacher)
        DistillConfig(**student)
        assert path.read_text().startswith("# ") and " train " in path.read_text().splitlines()[0]  # opens with its command
    bad = tmp_path / "bad.toml"
    bad.write_text("[teacher]\nepochs = 2\n[students]\nalpha = 1\n")
    with pytest.raises(ValueError, match=r"unknown table\(s\) \['students'\]"):
        load_run_config(bad)
    bad.write_text("[teacher\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_run_config(bad)


def test_train_refuses_an_unknown_student_field_before_any_stage(data, tmp_path):
    from click.testing import CliRunner

    from leader_edge.cli import main

    config = tmp_path / "run.toml"
    config.write_text("[student]\nalpah = 0.4\n")
    r = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--teacher", "tiny",
                                  "--config", str(config)])
    assert r.exit_code == 2 and "unknown [student] field(s) ['alpah']" in r.output
    assert not (tmp_path / "r").exists()


def test_code_limit_covers_the_longest_visit_of_the_data():
    from datetime import datetime

    from leader_edge.data.dataset import Dataset, Visit
    from leader_edge.train.distill import code_limit

    long = Visit("p", "v", datetime(2130, 1, 1), tuple(f"d{i}" for i in range(40)), (), ("A",))
    short = Visit("q", "w", datetime(2130, 1, 1), ("d1",), (), ("A",))
    assert code_limit(Dataset([long, short]), DistillConfig()) == 40  # no code of the data is cut
    assert code_limit(Dataset([short]), DistillConfig()) == 32


def test_student_shape_settings_reach_the_model_from_a_run_config(tmp_path):
    """[student] dim/heads/hidden/dropout/ffn_mult/temperature (defaults: StudentConfig's) build the model."""
    import torch

    from leader_edge.bedside.encoding import KINDS, Encoder
    from leader_edge.cli.train import _student_config
    from leader_edge.errors import ConfigError
    from leader_edge.train.distill import code_limit, train_student
    from leader_edge.train.student import StudentConfig
    from leader_edge.train.teacher_config import load_run_config

    assert DistillConfig().dim == StudentConfig.__dataclass_fields__["dim"].default  # one definition
    toml = tmp_path / "run.toml"
    toml.write_text("[student]\nepochs = 1\nbatch_size = 16\nmax_visits = 2\ndim = 16\nheads = 2\nhidden = 24\n"
                    "dropout = 0.1\nffn_mult = 1\ntemperature = 0.2\n")
    config = _student_config(load_run_config(toml)[1], toml)
    ds = synth_dataset(patients=16, seed=3)
    samples = dataset_splits(ds, seed=0, train_all_visits=True)
    encoder = Encoder.from_visits({k: ds.vocab(k) for k in KINDS}, ds.visits, max_visits=2, max_codes=code_limit(ds, config))
    model, _, _ = train_student(ds, samples, encoder, config, teacher=None, seed=0, device=torch.device("cpu"))
    c = model.config
    assert (c.dim, c.heads, c.hidden, c.dropout, c.ffn_mult, c.temperature) == (16, 2, 24, 0.1, 1, 0.2)
    with pytest.raises(ConfigError, match="dim=30 must be divisible by heads=4"):
        DistillConfig(dim=30)


def test_settings_the_counting_prior_ignores_are_refused():
    from leader_edge.errors import ConfigError

    for bad in ({"wide_neighbours": 10}, {"wide_init": "zero"}, {"wide_smoothing": 8.0}, {"zero_head": True}):
        name = next(iter(bad))
        with pytest.raises(ConfigError, match=f"{name}=.*no effect with prior='frequency'.*prior = \"none\""):
            DistillConfig(**bad)
        assert getattr(DistillConfig(prior="none", **bad), name) == bad[name]  # where they act, they are kept
