"""Export: ONNX round trip vs torch, int8 gate (pass, refuse, --force), bundle refusals, manifest.

One torch->ONNX export per module (~20 s on the shared VM); the other exports reuse its file by
replacing `export_onnx` with a copy, so they cost only quantization and validation."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from leader_edge.cli import main
from leader_edge.dataset import dataset_splits, load_dataset, write_dataset
from leader_edge.encoding import KINDS, Encoder
from leader_edge.export import bundle as bundle_module
from leader_edge.export.bundle import export_bundle
from leader_edge.runtime import Bundle, sha256


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from leader_edge.synth import synth_dataset
    from leader_edge.train.distill import save_student
    from leader_edge.train.student import Student, StudentConfig

    root = tmp_path_factory.mktemp("export")
    write_dataset(synth_dataset(patients=150, seed=3), root / "data", source="synth")
    ds = load_dataset(root / "data")
    encoder = Encoder.from_visits({k: ds.vocab(k) for k in KINDS}, ds.visits)
    torch.manual_seed(0)
    model = Student(StudentConfig(encoder.n_codes, encoder.n_meds, encoder.n_profile_ids, encoder.med_offset, dropout=0.0))
    with torch.no_grad():  # random weights, scaled so probabilities spread over (0, 1) instead of sitting at 0.5
        for p in model.parameters():
            p.normal_(0, 0.15)
    (root / "run" / "student").mkdir(parents=True)
    save_student(root / "run" / "student", model.eval(), encoder, 0.5, {"distill": True, "seed": 42, "data": str(root / "data")})
    return root / "run"


@pytest.fixture(scope="module")
def fp32_bundle(run_dir) -> Path:
    out = run_dir.parent / "bundle-fp32"
    export_bundle(run_dir, out)
    return out


@pytest.fixture
def reuse_export(fp32_bundle, monkeypatch):
    """Skip the torch export: copy the module's fp32 model instead."""
    def copy(model, path, inputs):
        shutil.copy(fp32_bundle / "model.onnx", path)
        return Path(path)

    monkeypatch.setattr(bundle_module.onnx_export, "export_onnx", copy)


def test_export_onnx_round_trip_matches_torch(run_dir, fp32_bundle):
    from leader_edge.train.distill import load_student

    manifest = json.loads((fp32_bundle / "manifest.json").read_text())
    assert manifest["validation"]["max_abs_dp"] < 1e-5
    model, encoder, _ = load_student(run_dir / "student", backend="torch")
    ds = load_dataset(run_dir.parent / "data")
    val = [s.visits for s in dataset_splits(ds, seed=42)["val"]]
    bundle = Bundle.load(fp32_bundle)
    for histories in (val, val[:1], [val[0][-1:]]):  # every dynamic axis at several sizes, down to 1
        got, _ = bundle.predict_proba(histories)
        batch = encoder.encode(histories)
        with torch.no_grad():
            want = model.predict_proba(*(torch.from_numpy(a) for a in batch.inputs().values())).numpy()
        assert np.abs(got - want).max() < 1e-5


def test_export_manifest_checksum_and_fields(fp32_bundle):
    manifest = json.loads((fp32_bundle / "manifest.json").read_text())
    assert manifest["model"]["sha256"] == sha256(fp32_bundle / "model.onnx")
    assert manifest["model"]["variant"] == "fp32" and manifest["threshold"] == 0.5
    for key in ("format_version", "created", "encoder", "profile_fields", "ddi_pairs", "validation", "packages"):
        assert manifest[key], key
    assert manifest["packages"]["onnxruntime"] and manifest["ddi_pairs"][0][0] < manifest["ddi_pairs"][0][1]
    assert sorted(p.name for p in fp32_bundle.iterdir()) == ["manifest.json", "model.onnx"]


def test_export_int8_passes_gate_and_shrinks(run_dir, fp32_bundle, reuse_export, tmp_path):
    manifest = export_bundle(run_dir, tmp_path / "int8", int8=True, calibration_samples=64)
    v = manifest["validation"]
    assert manifest["model"]["variant"] in ("int8-dynamic", "int8-static")
    assert set(v["candidates"]) == {"fp32", "int8-dynamic", "int8-static"}
    assert -v["jaccard_delta"] <= bundle_module.MAX_JACCARD_DROP and v["max_abs_dp"] < 0.1
    assert manifest["model"]["bytes"] <= 0.4 * manifest["model"]["fp32_bytes"]
    assert "forced" not in v


def test_export_gate_failure_refused_then_forced(run_dir, reuse_export, monkeypatch, tmp_path):
    monkeypatch.setattr(bundle_module, "MAX_JACCARD_DROP", -1.0)  # any bundle now "drops" too much
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(run_dir), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "bundle refused" in result.output and "--force" in result.output
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == []  # nothing half-written
    result = runner.invoke(main, ["export", str(run_dir), "--out", str(tmp_path / "b"), "--force"])
    assert result.exit_code == 0, result.output
    assert "FAILED the validation gate" in result.output
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["validation"]["forced"] is True


def test_export_refuses_run_dir_and_foreign_directory(run_dir, fp32_bundle, reuse_export, tmp_path):
    for dst in (run_dir, run_dir / "student"):
        with pytest.raises(ValueError, match="run directory"):
            export_bundle(run_dir, dst)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a leader-edge bundle"):
        export_bundle(run_dir, foreign)
    assert (foreign / "keep.txt").read_text() == "mine"
    again = tmp_path / "again"
    shutil.copytree(fp32_bundle, again)
    (again / "model.onnx").write_bytes(b"stale")
    export_bundle(run_dir, again)  # an older bundle is replaced
    assert Bundle.load(again).manifest["model"]["sha256"] == sha256(again / "model.onnx")
