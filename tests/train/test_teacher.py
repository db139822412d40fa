"""Teacher: head, exact layer split, LoRA training, the run-directory files, save/load, resume, CLI."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from leader_edge.data.dataset import load_dataset, write_dataset
from leader_edge.data.splits import dataset_splits
from leader_edge.bedside.recs import read_predictions
from leader_edge.data.synth import synth_dataset
from leader_edge.train.teacher import run_teacher_stage
from leader_edge.train.teacher_config import TeacherConfig, load_run_config
from leader_edge.train.teacher_data import encode_samples, pad_batch
from leader_edge.train.teacher_model import TeacherModel

LEADER_7B = Path(__file__).resolve().parents[2] / "configs" / "leader-7b.toml"
# Byte-level tokens: ~700 per prompt; max_tokens keeps the tiny runs at a few seconds.
TINY = dict(teacher="tiny", max_tokens=400, epochs=2, batch_size=8, grad_accum=2, timing_patients=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(synth_dataset(patients=40, seed=3), tmp_path_factory.mktemp("d") / "synth", source="synth")


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    result = run_teacher_stage(data_dir, run, TeacherConfig(**TINY))
    return run, result


def _batch(model, data_dir, n=4):
    ds = load_dataset(data_dir)
    samples = dataset_splits(ds, train_all_visits=True)["train"][:n]
    enc = encode_samples(ds, samples, model.tokenizer, model.med_codes, max_history=3, max_tokens=400)
    ids, lengths = pad_batch(enc.ids, model.tokenizer.pad_token_id)
    return ids, lengths, torch.from_numpy(enc.labels)


def test_teacher_head_shape_and_loss(data_dir):
    meds = load_dataset(data_dir).vocab("medication")
    model = TeacherModel(TeacherConfig(teacher="tiny"), meds)
    ids, lengths, y = _batch(model, data_dir)
    logits = model(model.lower(ids, lengths), lengths)
    assert logits.shape == (4, len(meds))
    assert model.head.in_features == model.hidden_size and model.head.out_features == len(meds)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    assert torch.isfinite(loss) and 0.3 < loss.item() < 1.5  # random init: close to log(2)


def test_teacher_split_equals_full_forward(data_dir):
    meds = load_dataset(data_dir).vocab("medication")
    split = TeacherModel(TeacherConfig(teacher="tiny", lora_layers=1), meds).eval()
    plain = TeacherModel(TeacherConfig(teacher="tiny", lora_layers=1, plain=True), meds).eval()
    with torch.no_grad():
        for n, p in split.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a trained-looking adapter, so the LoRA path matters
    plain.load_trainable_state(split.trainable_state())
    ids, lengths, _ = _batch(split, data_dir)
    assert split.split == 1 and len(set(lengths.tolist())) > 1  # padding is exercised
    with torch.no_grad():
        a = split.features(split.lower(ids, lengths), lengths)
        b = plain.features(plain.lower(ids, lengths), lengths)
        one = split.features(split.lower(ids[:1, : lengths[0]], lengths[:1]), lengths[:1])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[:1], one, atol=1e-5, rtol=1e-5)


def _tiny_family_dir(tmp_path, family: str) -> str:
    """A local Hugging Face directory: a tiny random `family` model (3 layers) + the byte tokenizer."""
    import transformers

    from leader_edge.train.backbone import tiny_tokenizer

    tok = tiny_tokenizer()
    n = len(tok)
    common = dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=n - 2, eos_token_id=n - 1)
    config = {"qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig,
              "gemma2": transformers.Gemma2Config}[family](**common)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config)
    out = tmp_path / family
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_teacher_split_equals_full_forward_other_families(data_dir, tmp_path, family):
    meds = load_dataset(data_dir).vocab("medication")
    spec = _tiny_family_dir(tmp_path, family)
    split = TeacherModel(TeacherConfig(teacher=spec, lora_layers=1), meds).eval()
    plain = TeacherModel(TeacherConfig(teacher=spec, lora_layers=1, plain=True), meds).eval()
    with torch.no_grad():
        for n, p in split.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    plain.load_trainable_state(split.trainable_state())
    ids, lengths, _ = _batch(split, data_dir)
    assert split.exact_split and split.split == 2
    with torch.no_grad():
        a = split.features(split.lower(ids, lengths), lengths)
        b = plain.features(plain.lower(ids, lengths), lengths)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_teacher_untested_family_takes_the_plain_path(data_dir, tmp_path, caplog):
    meds = load_dataset(data_dir).vocab("medication")
    model = TeacherModel(TeacherConfig(teacher=_tiny_family_dir(tmp_path, "gemma2"), lora_layers=1), meds)
    assert not model.exact_split and model.split == 0
    assert "plain path" in caplog.text


def test_teacher_lora_moves_and_backbone_does_not(data_dir):
    meds = load_dataset(data_dir).vocab("medication")
    model = TeacherModel(TeacherConfig(teacher="tiny", lora_layers=1), meds)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, lengths, y = _batch(model, data_dir)
    for _ in range(3):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(model.lower(ids, lengths), lengths), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved == trainable
    assert any("lora_B" in n for n in moved) and "head.weight" in moved
    assert not any("lora" in n for n in trainable if ".layers.0." in n)  # only the top layer is adapted


def test_teacher_stage_writes_the_contract_files(tiny_run, data_dir):
    run, result = tiny_run
    ds = load_dataset(data_dir)
    splits = dataset_splits(ds, train_all_visits=True)
    with safe_open(str(run / "teacher" / "features.safetensors"), "pt") as f:
        meta = f.metadata()
        shapes = {k: tuple(f.get_tensor(k).shape) for k in ("train", "val", "test")}
    keys = json.loads(meta["keys"])
    hidden = int(meta["hidden_size"])
    assert keys["train"] == [f"{s.patient_id}/{s.target.visit_id}" for s in splits["train"]]
    train_patients = {s.patient_id for s in splits["train"]}
    assert len(keys["train"]) == sum(len(v) for p, v in ds.patients().items() if p in train_patients)
    assert keys["val"] == [f"{s.patient_id}/{s.target.visit_id}" for s in splits["val"]]
    assert all(shapes[k] == (len(keys[k]), hidden) for k in shapes)
    saved = json.loads((run / "teacher" / "metrics.json").read_text())
    assert saved["val"]["prauc"] == pytest.approx(result["val"]["prauc"])
    assert {"threshold", "n_params", "inference_ms_per_patient", "test"} <= set(saved)
    preds = read_predictions(run / "teacher" / "predictions-test.csv")
    assert [p.visit_id for p in preds] == [s.target.visit_id for s in splits["test"]]
    # written through files.atomic_file: the umask's mode (safetensors alone makes 0600), no temp left
    umask = os.umask(0)
    os.umask(umask)
    for name in ("features.safetensors", "adapter.safetensors", "metrics.json", "config.json"):
        assert (run / "teacher" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert not [p.name for p in (run / "teacher").iterdir() if p.name.startswith(".")]


def test_teacher_save_load_reproduces_probabilities(tiny_run):
    run, _ = tiny_run
    model = TeacherModel.load(run / "teacher")
    feats = load_file(str(run / "teacher" / "features.safetensors"))["test"]
    with torch.no_grad():
        from_features = torch.sigmoid(model.head(feats)).numpy()
    preds = read_predictions(run / "teacher" / "predictions-test.csv")
    scores = np.array([[p.scores.get(c, 0.0) for c in model.med_codes] for p in preds])  # ~0 may be omitted
    np.testing.assert_allclose(from_features, scores, atol=6e-5)  # the file keeps 4 decimals


def test_teacher_resume_after_interruption_matches_uninterrupted(tiny_run, data_dir, tmp_path):
    run, _ = tiny_run
    config = TeacherConfig(**TINY)
    assert run_teacher_stage(data_dir, tmp_path, config, stop_after_epoch=1) == {}
    assert not (tmp_path / "teacher" / "adapter.safetensors").exists()
    run_teacher_stage(data_dir, tmp_path, config, resume=True)
    resumed = load_file(str(tmp_path / "teacher" / "adapter.safetensors"))
    straight = load_file(str(run / "teacher" / "adapter.safetensors"))
    assert resumed.keys() == straight.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], atol=0, rtol=0)
    history = json.loads((tmp_path / "teacher" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]


def test_teacher_resume_refuses_a_checkpoint_of_another_dataset_or_configuration(data_dir, tmp_path):
    """A checkpoint copied from a run on other data was resumed without a word (its epochs counted as
    this run's); one of another lora_r ended in a state_dict RuntimeError."""
    from leader_edge.errors import StateError

    assert run_teacher_stage(data_dir, tmp_path, TeacherConfig(**TINY), stop_after_epoch=1) == {}
    other = write_dataset(synth_dataset(patients=40, seed=4), tmp_path / "other", source="synth")
    for data, config in ((other, TeacherConfig(**TINY)), (data_dir, TeacherConfig(**{**TINY, "lora_r": 4}))):
        with pytest.raises(StateError, match="--resume: the checkpoint in .* was written for another dataset"):
            run_teacher_stage(data, tmp_path, config, resume=True)
    # a larger budget, recomputation, the other state cache and a timing sample: speed and memory, not
    # the weights (a resume after running out of memory turns these on)
    resumed = TeacherConfig(**{**TINY, "epochs": 3, "gradient_checkpointing": True, "state_cache": "memory",
                               "timing_patients": 1, "cache_batch_tokens": 1024})
    result = run_teacher_stage(data_dir, tmp_path, resumed, resume=True)
    assert [h["epoch"] for h in result["history"]][0] == 1 and len(result["history"]) >= 2


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists open files through Linux's /proc")
def test_failed_teacher_stage_leaves_no_open_or_stored_shard(data_dir, tmp_path, monkeypatch):
    """A stage that fails while tuning on disk-cached states: its traceback keeps the stores alive,
    yet the cache is removed and none of its shards is still open (an open deleted file keeps its
    disk space; on NFS it would block the removal)."""
    import leader_edge.train.teacher as teacher

    calls = []

    def failing_pad_states(states):
        calls.append(1)
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(teacher, "pad_states", failing_pad_states)
    with pytest.raises(RuntimeError, match="simulated") as e:
        run_teacher_stage(data_dir, tmp_path / "run", TeacherConfig(**{**TINY, "epochs": 1, "state_cache": "disk"}))
    assert calls and e.value.__traceback__ is not None  # the failing frames (and their stores) are alive here
    assert not (tmp_path / "run" / "teacher" / ".cache").exists()
    open_files = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.islink(f"/proc/self/fd/{fd}")]
    assert not [f for f in open_files if str(tmp_path) in f], open_files


def test_teacher_cli_show_prompt(data_dir):
    from leader_edge.cli import main

    result = CliRunner().invoke(main, ["train", "--data", str(data_dir), "--teacher", "tiny", "--show-prompt", "1"])
    assert result.exit_code == 0, result.output
    assert "tokens with the appended EOS" in result.output
    assert "Then, the patient should be prescribed:" in result.output
    bad = CliRunner().invoke(main, ["train", "--data", str(data_dir), "--teacher", "tiny", "--show-prompt", "99999"])
    assert bad.exit_code == 2 and "choose 0.." in bad.output


def test_teacher_smollm2_short_real_run(data_dir, tmp_path):
    config = TeacherConfig(teacher="smollm2", backbone_layers=2, lora_layers=1, epochs=1, max_history=1,
                           max_tokens=128, timing_patients=1)
    result = run_teacher_stage(data_dir, tmp_path, config)
    assert result["backbone"]["hidden_size"] == 576 and result["backbone"]["layers"] == 2
    assert 0.0 <= result["val"]["prauc"] <= 1.0
    assert result["n_params"]["trainable"] < result["n_params"]["total"] / 10


def test_teacher_cli_student_stage_needs_a_finished_teacher(data_dir, tmp_path):
    from leader_edge.cli import main

    args = ["train", "--data", str(data_dir), "--out", str(tmp_path), "--teacher", "tiny", "--stage", "student"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "run with --stage teacher" in result.output
    assert json.loads((tmp_path / "run.json").read_text())["data"] == str(data_dir.resolve())


def test_teacher_frequency_prior_reloads_with_its_offsets(data_dir, tmp_path):
    from leader_edge.train.teacher import prior_logits

    config = TeacherConfig(**{**TINY, "epochs": 1, "prior": "frequency"})
    result = run_teacher_stage(data_dir, tmp_path, config)
    assert result["backbone"]["prior"] == "frequency"
    ds = load_dataset(data_dir)
    offsets = prior_logits(ds, dataset_splits(ds, train_all_visits=True), config)
    model = TeacherModel.load(tmp_path / "teacher")
    feats = load_file(str(tmp_path / "teacher" / "features.safetensors"))["test"]
    with torch.no_grad():
        probs = torch.sigmoid(model.head(feats) + torch.from_numpy(offsets["test"])).numpy()
    preds = read_predictions(tmp_path / "teacher" / "predictions-test.csv")
    scores = np.array([[p.scores.get(c, 0.0) for c in model.med_codes] for p in preds])
    np.testing.assert_allclose(probs, scores, atol=6e-5)


def test_teacher_config_rejects_an_unknown_prior():
    with pytest.raises(ValueError, match="prior"):
        TeacherConfig(prior="cooc")


def test_dry_run_needs_only_config_json_and_counts_parameters(data_dir, tmp_path):
    import transformers

    from leader_edge.cli import main

    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2)
    model_dir = tmp_path / "model"
    config.save_pretrained(model_dir)  # config.json only: no weights, no tokenizer
    assert [p.name for p in model_dir.iterdir()] == ["config.json"]
    want = sum(p.numel() for p in transformers.AutoModel.from_config(config).parameters())
    r = CliRunner().invoke(main, ["train", "--data", str(data_dir), "--teacher", str(model_dir), "--dry-run",
                                  "--world-size", "2", "--lora-layers", "3"])
    assert r.exit_code == 0, r.output
    assert f"parameters {want:,}" in r.output and "ESTIMATED" in r.output and "world size 2" in r.output
    n_meds = len(load_dataset(data_dir).vocab("medication"))
    # LoRA r=8 on q,k,v,o (64->64, 64->32 for k/v) and gate/up/down (64<->128) in 3 layers + the head
    lora = 3 * 8 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    assert f"trainable {lora + 64 * n_meds + n_meds:,}" in r.output


def test_teacher_disk_and_memory_state_caches_give_the_same_features(data_dir, tmp_path):
    from safetensors.numpy import load_file

    feats = {}
    for cache in ("disk", "memory"):
        run = tmp_path / cache
        run_teacher_stage(data_dir, run, TeacherConfig(**{**TINY, "epochs": 1, "state_cache": cache}))
        feats[cache] = load_file(str(run / "teacher" / "features.safetensors"))
        assert not (run / "teacher" / ".cache").exists()  # shards removed when the stage ends
    for split in ("train", "val", "test"):
        np.testing.assert_allclose(feats["disk"][split], feats["memory"][split], atol=1e-6)


def test_teacher_gradient_checkpointing_gives_the_same_gradients(data_dir):
    meds = load_dataset(data_dir).vocab("medication")
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = TeacherModel(TeacherConfig(teacher="tiny", lora_layers=2, lora_dropout=0.0, gradient_checkpointing=recompute), meds)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        model.train()
        ids, lengths, y = _batch(model, data_dir)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(model.lower(ids, lengths), lengths), y)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 2
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_teacher_config_reads_the_field_name_of_older_runs():
    from leader_edge.train.teacher_config import TeacherConfig

    assert TeacherConfig.from_dict({"train_per_visit": False}).train_all_visits is False  # RUN/teacher/config.json before the rename
    assert TeacherConfig.from_dict({"train_all_visits": False}).train_all_visits is False


def test_teacher_bf16_run_loads_bf16_weights_and_keeps_adapters_and_head_fp32(data_dir, tmp_path):
    meds = load_dataset(data_dir).vocab("medication")
    models = {bf16: TeacherModel(TeacherConfig(teacher="tiny", lora_layers=1, bf16=bf16), meds).eval() for bf16 in (False, True)}
    frozen = {n: p.dtype for n, p in models[True].named_parameters() if not p.requires_grad}
    trained = {n: p.dtype for n, p in models[True].named_parameters() if p.requires_grad}
    assert set(frozen.values()) == {torch.bfloat16} and len(frozen) > 10
    assert set(trained.values()) == {torch.float32} and "head.weight" in trained and any("lora_A" in n for n in trained)
    assert {p.dtype for p in models[False].parameters()} == {torch.float32}
    ids, lengths, _ = _batch(models[False], data_dir)
    with torch.no_grad():
        f = {bf16: m.features(m.lower(ids, lengths), lengths) for bf16, m in models.items()}
    assert f[True].dtype == torch.float32
    # the same random model rounded to bf16 and run under bf16 autocast: within a few bf16 ulps
    torch.testing.assert_close(f[True], f[False], atol=0.15, rtol=0.05)
    result = run_teacher_stage(data_dir, tmp_path, TeacherConfig(**{**TINY, "epochs": 1, "bf16": True}))  # CPU autocast too
    assert 0.0 <= result["val"]["prauc"] <= 1.0
    assert np.isfinite(load_file(str(tmp_path / "teacher" / "features.safetensors"))["train"].numpy()).all()


@pytest.mark.parametrize("bf16", [False, True])
def test_dry_run_counts_the_weight_bytes_the_teacher_loads(data_dir, bf16):
    from leader_edge.train.dry_run import dry_run

    config = TeacherConfig(teacher="tiny", lora_layers=1, bf16=bf16)
    plan = dry_run(data_dir, config)
    model = TeacherModel(config, load_dataset(data_dir).vocab("medication"))
    loaded = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert plan["weight_bytes"] == loaded and plan["weight_dtype"] == ("bfloat16" if bf16 else "float32")
    assert plan["memory"]["weights_gib"] == round(loaded / 1024 ** 3, 3)


@pytest.mark.parametrize("settings", [dict(lora_layers=1), dict(lora_layers="all"), dict(lora_layers=1, plain=True)])
def test_dry_run_plans_the_cache_the_run_builds(data_dir, settings):
    """States of the frozen layers when the body splits below its tuned layers, token ids otherwise:
    the plan and the run decide it by one rule (`teacher_model.state_split`)."""
    from leader_edge.train.dry_run import dry_run, format_plan

    config = TeacherConfig(teacher="tiny", **settings)
    plan = dry_run(data_dir, config)
    model = TeacherModel(config, load_dataset(data_dir).vocab("medication"))
    assert plan["cache_holds"] == ("states" if model.split > 0 else "token ids")
    assert plan["cache_holds"] == ("states" if settings == dict(lora_layers=1) else "token ids")
    assert f"GiB of {plan['cache_holds']} " in format_plan(plan)


def test_dry_run_host_memory_per_node_on_config_json_alone(data_dir, tmp_path):
    import transformers

    from leader_edge.cli import main
    from leader_edge.train.dry_run import TOKEN_TABLE_BYTES, dry_run
    from leader_edge.train.state_store import SHARD_BYTES

    model_dir = tmp_path / "model"
    transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2).save_pretrained(model_dir)
    config = TeacherConfig(teacher=str(model_dir), lora_layers=1, bf16=True, cache_batch_tokens=512)
    plan = dry_run(data_dir, config, world_size=4, ranks_per_node=2)
    gib, m, splits = 1024 ** 3, plan["memory"], plan["splits"].values()
    tokens, prompts = sum(s["tokens"] for s in splits), sum(s["prompts"] for s in splits)
    n_meds = plan["medications"]
    assert m["host_weights_gib"] == round(plan["parameters"] * 2 / gib, 3)  # bf16: what each rank builds on the host
    assert m["host_tables_gib"] == round((tokens * TOKEN_TABLE_BYTES + 2 * prompts * n_meds * 4) / gib, 3)
    cache = tokens * 64 * 2  # bf16 states of the 2 frozen layers
    share = (plan["splits"]["train"]["tokens"] + plan["splits"]["val"]["tokens"]) / tokens * cache / 4
    assert m["host_state_buffer_gib"] == round((min(SHARD_BYTES, share) + 512 * 64 * 2) / gib, 3)
    assert m["host_per_node_gib"] == pytest.approx(2 * m["host_per_rank_gib"] + prompts * 64 * 4 / gib, abs=2e-3)
    r = CliRunner().invoke(main, ["train", "--data", str(data_dir), "--teacher", str(model_dir), "--dry-run", "--world-size", "2",
                                  "--lora-layers", "1", "--config", str(LEADER_7B)])
    assert r.exit_code == 0, r.output
    assert "host memory per node (estimate, 2 ranks per node)" in r.output and "weights 0.00 (bfloat16)" in r.output
    # the CLI's --ranks-per-node (torchrun's LOCAL_WORLD_SIZE) and --lora-layers all reach the plan
    r = CliRunner().invoke(main, ["train", "--data", str(data_dir), "--teacher", str(model_dir), "--dry-run", "--world-size", "4",
                                  "--ranks-per-node", "2", "--lora-layers", "all", "--config", str(LEADER_7B)])
    assert r.exit_code == 0, r.output
    assert "host memory per node (estimate, 2 ranks per node)" in r.output and "(LoRA on 3)" in r.output
    r = CliRunner().invoke(main, ["train", "--data", str(data_dir), "--teacher", str(model_dir), "--dry-run", "--world-size", "4",
                                  "--ranks-per-node", "3"])
    assert r.exit_code == 2 and "3 does not divide --world-size 4" in r.output
    r = CliRunner().invoke(main, ["train", "--data", str(data_dir), "--dry-run", "--lora-layers", "some"])
    assert r.exit_code == 2 and "'some' is not an integer >= 1 or 'all'" in r.output


def test_teacher_all_layers_adapted_cache_keeps_only_token_ids(data_dir, tmp_path, monkeypatch):
    from leader_edge.train.state_store import StateStore

    stored = []
    put = StateStore.put
    monkeypatch.setattr(StateStore, "put", lambda self, i, state: (stored.append(state.clone()), put(self, i, state)))
    result = run_teacher_stage(data_dir, tmp_path, TeacherConfig(**{**TINY, "epochs": 1, "lora_layers": "all"}))
    assert result["backbone"]["lora_layers"] == result["backbone"]["layers"] == 2
    ds = load_dataset(data_dir)
    n = sum(len(v) for v in dataset_splits(ds, train_all_visits=True).values())
    assert len(stored) == n  # every prompt of every split went through the store ...
    assert all(s.dtype == torch.int64 and s.dim() == 1 for s in stored)  # ... as its token ids, no [L, hidden] state
    model = TeacherModel.load(tmp_path / "teacher")
    enc = encode_samples(ds, dataset_splits(ds, train_all_visits=True)["test"], model.tokenizer, model.med_codes,
                         max_history=3, max_tokens=400)
    assert {tuple(ids) for ids in enc.ids} <= {tuple(s.tolist()) for s in stored}


def test_teacher_config_lora_layers_all_adapts_every_layer_of_any_depth():
    from leader_edge.errors import ConfigError

    config = TeacherConfig(lora_layers="all")
    assert config.adapted_layers(28) == 28 and config.adapted_layers(32) == 32  # Qwen2-7B, Llama-2-7B
    assert TeacherConfig.from_dict(config.to_dict()).lora_layers == "all"
    with pytest.raises(ConfigError, match="choose 1..28"):
        TeacherConfig(lora_layers=32).adapted_layers(28)
    for bad in ("most", 0, True):
        with pytest.raises(ConfigError, match="lora_layers"):
            TeacherConfig(lora_layers=bad)


def test_leader_7b_config_lists_leaders_lora_and_fits_a_28_layer_qwen2(data_dir, tmp_path):
    import transformers

    from leader_edge.train.dry_run import dry_run
    from leader_edge.train.teacher_config import LORA_TARGETS

    text = LEADER_7B.read_text(encoding="utf-8")
    assert text.startswith("# torchrun --nproc_per_node 4 -m leader_edge train ") and "--config configs/leader-7b.toml" in text.splitlines()[0]
    assert "shared" in text and "--resume" in text  # multi-node resume needs RUN on a filesystem every node mounts
    teacher, _ = load_run_config(LEADER_7B)
    assert teacher["lora_targets"] == list(LORA_TARGETS) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model_dir = tmp_path / "qwen2"
    transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=28,
                             num_attention_heads=4, num_key_value_heads=2).save_pretrained(model_dir)
    plan = dry_run(data_dir, TeacherConfig.from_dict({**teacher, "teacher": str(model_dir)}), world_size=4)
    assert plan["layers"] == plan["lora_layers"] == 28 and plan["weight_dtype"] == "bfloat16"


def test_leader_7b_config_runs_end_to_end_in_miniature(data_dir, tmp_path):
    """The recipe never ran on GPUs here; in miniature (the tiny teacher, 1 teacher and 2 student
    epochs) every one of its fields reaches the run: LoRA on all layers, bf16 weights, recomputation,
    LEADER's loss weights in the student."""
    from leader_edge.cli import main

    run = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--data", str(data_dir), "--out", str(run), "--teacher", "tiny",
                                  "--config", str(LEADER_7B), "--epochs", "1", "--student-epochs", "2"])
    assert r.exit_code == 0, r.output
    teacher = json.loads((run / "teacher" / "config.json").read_text())["teacher"]
    want, student = load_run_config(LEADER_7B)
    assert {k: teacher[k] for k in want if k != "epochs"} == {k: v for k, v in want.items() if k != "epochs"}
    used = json.loads((run / "student" / "metrics.json").read_text())["config"]
    assert {k: used[k] for k in student} == student and student["alpha"] == 0.4
    assert 0.0 <= json.loads((run / "student" / "metrics.json").read_text())["test"]["prauc"] <= 1.0


def test_teacher_resume_refuses_ranks_that_see_different_checkpoints(tmp_path):
    from leader_edge.train.teacher import same_checkpoint_everywhere

    same_checkpoint_everywhere(["ab12", "ab12", "ab12", "ab12"], tmp_path)  # one shared filesystem
    same_checkpoint_everywhere([None, None], tmp_path)  # a fresh run
    with pytest.raises(RuntimeError, match="filesystem every node mounts") as e:
        same_checkpoint_everywhere(["ab12", "ab12", None, None], tmp_path)  # node 2's local disk has none
    assert "{'ab12': [0, 1], 'none': [2, 3]}" in str(e.value)
    with pytest.raises(RuntimeError, match="different checkpoints"):
        same_checkpoint_everywhere(["ab12", "cd34"], tmp_path)  # a stale copy on another node
