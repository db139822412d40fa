"""The teacher stage: LoRA-tune LEADER(T), then write its features, metrics and test predictions.

    run_teacher_stage(data_dir, run_dir, TeacherConfig())            # one process
    torchrun --nproc_per_node 2 -m leader_edge train --data D --out R  # DDP (gloo on CPU, nccl on GPU)

Writes RUN/teacher/: config.json + adapter.safetensors (LoRA + head), metrics.json,
predictions-test.csv, features.safetensors (see the run-directory contract), and checkpoint/
while training (`resume=True` continues from its last finished epoch).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from leader_edge.errors import StateError
from leader_edge.evaluation import metrics
from leader_edge.data.dataset import load_dataset
from leader_edge.data.splits import dataset_splits
from leader_edge.train.teacher_checkpoint import load_checkpoint, save_checkpoint
from leader_edge.train.teacher_config import TeacherConfig
from leader_edge.train.teacher_data import FEATURES, Encoded, encode_samples, length_batches, lower_cache, pad_batch, pad_states
from leader_edge.train.teacher_model import ADAPTER, TeacherModel

log = logging.getLogger(__name__)

METRICS = "metrics.json"
PREDICTIONS = "predictions-test.csv"


def teacher_done(run_dir: Path) -> bool:
    """True when RUN/teacher holds a finished stage (features and metrics written last)."""
    t = Path(run_dir) / "teacher"
    return (t / FEATURES).is_file() and (t / METRICS).is_file()


def _distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        # 2 processes on 2 cores: one thread each, or they fight over the cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _store(out: Path, name: str, n: int, config: TeacherConfig):
    """A disk store for one set of frozen states (`config.state_cache == "disk"`), else None (in memory)."""
    if config.state_cache != "disk":
        return None
    from leader_edge.train.state_store import StateStore

    from leader_edge.train.backbone import weight_dtype

    return StateStore.create(out / ".cache" / name, n, dtype=weight_dtype(config.bf16))  # bf16 states in a bf16 run


def _drop_cache(out: Path, rank: int) -> None:
    """Remove this rank's frozen-state shards (rank 0: also the shared ones and the empty directory)."""
    import shutil

    from leader_edge.train.state_store import close_stores

    cache = out / ".cache"
    close_stores(cache)  # a failed stage's stores live on in its traceback: their descriptors close here
    for d in cache.glob(f"*-rank{rank}"):
        shutil.rmtree(d, ignore_errors=True)
    if rank == 0:
        for name in ("rest", "val-rest", "test"):
            shutil.rmtree(cache / name, ignore_errors=True)
        try:
            cache.rmdir()
        except OSError:  # other ranks' shards still there, or no cache at all
            pass


def rank0_value(value: float, device: torch.device) -> float:
    """Rank 0's `value` on every rank (unchanged without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.broadcast(t, src=0)
    return float(t.item())


def _lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over `warmup * total` steps, then linear decay to 0 at `total`."""
    w = max(1, int(round(warmup * total)))
    if step < w:
        return (step + 1) / w
    return max(0.0, (total - step) / max(1, total - w))


def prior_logits(ds, splits: dict[str, list], config: TeacherConfig) -> dict[str, np.ndarray]:
    """float32 [N, M] logit offsets per split (`config.prior`), rows in `splits` order.

    "frequency": logit of the frequency baseline (rule and smoothing chosen on validation as
    `evaluate --baseline` does), out-of-fold by patient for the training samples (see
    `baselines.out_of_fold_proba`). "none": zeros (LEADER's head alone).
    """
    m = len(ds.vocab("medication"))
    if config.prior == "none":
        return {k: np.zeros((len(v), m), dtype=np.float32) for k, v in splits.items()}
    from leader_edge.evaluation.baselines import fit_frequency_baseline, out_of_fold_proba

    base, _, _ = fit_frequency_baseline(ds, splits)
    probs = {k: base.predict_proba(v) for k, v in splits.items() if k != "train"}
    probs["train"] = out_of_fold_proba(ds, splits["train"], rule=base.rule, smoothing=base.smoothing, seed=config.seed)
    out = {}
    for k, p in probs.items():
        p = np.clip(p, 1e-4, 1 - 1e-4)
        out[k] = np.log(p / (1 - p)).astype(np.float32)
    return out


@torch.no_grad()
def predict(model: TeacherModel, states: list[torch.Tensor], offsets: np.ndarray, *, batch_size: int,
            device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [N, M], features [N, hidden]) from cached lower states and the prior's logit
    offsets [N, M], in row order."""
    from leader_edge.train.state_store import lengths_of

    model.eval()
    lengths = lengths_of(states)
    probs = np.zeros((len(states), len(model.med_codes)), dtype=np.float32)
    feats = np.zeros((len(states), model.hidden_size), dtype=np.float32)
    for batch in length_batches(lengths, batch_size):
        x, lens = pad_states([states[i] for i in batch])
        f = model.features(x.to(device), lens.to(device))
        probs[batch] = torch.sigmoid(model.head(f).float().cpu() + torch.from_numpy(offsets[batch])).numpy()
        feats[batch] = f.float().cpu().numpy()
    return probs, feats


def _progress(total: int, desc: str, rank: int):
    """Token progress of the teacher's passes: drawn by rank 0 only (`leader_edge.progress`)."""
    from leader_edge.progress import progress

    return progress(total, desc=desc, unit="tok", enabled=rank == 0)


def run_teacher_stage(
    data_dir: Path, run_dir: Path, config: TeacherConfig, *, resume: bool = False, stop_after_epoch: int | None = None
) -> dict:
    """Tune the teacher on DIR's training split and write RUN/teacher (see the module docstring).

    Args:
        data_dir: dataset directory.
        run_dir: run directory; RUN/teacher is (re)written.
        config: teacher configuration.
        resume: continue from RUN/teacher/checkpoint if present.
        stop_after_epoch: stop after this epoch (checkpoint written) - simulates an interruption.

    Returns:
        The metrics dict written to RUN/teacher/metrics.json (rank 0; {} on other ranks or when stopped early).
    """
    try:
        return _teacher_stage(data_dir, run_dir, config, resume=resume, stop_after_epoch=stop_after_epoch)
    finally:  # the frozen-state shards (GBs at MIMIC scale) never outlive the stage, whatever ends it
        _drop_cache(Path(run_dir) / "teacher", int(os.environ.get("RANK", "0")))
        # Each rank leaves the process group itself: a rank that exits with the group still open
        # (rank 1 while rank 0 writes features) can abort in the backend's teardown.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _teacher_stage(data_dir: Path, run_dir: Path, config: TeacherConfig, *, resume: bool, stop_after_epoch: int | None) -> dict:
    t_start = time.perf_counter()
    rank, world, device = _distributed()
    out = Path(run_dir) / "teacher"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    ds = load_dataset(data_dir)
    med_codes = ds.vocab("medication")
    splits = dataset_splits(ds, seed=config.seed, train_all_visits=True, protocol=config.protocol)
    model = TeacherModel(config, med_codes).to(device)
    encode = dict(max_history=config.max_history, max_tokens=config.max_tokens)
    enc = {name: encode_samples(ds, splits[name], model.tokenizer, med_codes, **encode) for name in ("train", "val", "test")}
    last_ids = {v[-1].visit_id for v in ds.patients().values()}
    last_visit = [i for i, s in enumerate(enc["train"].samples) if s.target.visit_id in last_ids]
    tune_rows = list(range(len(enc["train"].ids))) if config.train_all_visits else last_visit
    mine = tune_rows[rank::world]  # a fixed shard per rank: each caches only its own samples
    tune = enc["train"].subset(mine)
    offsets = prior_logits(ds, splits, config)
    tune_offsets = offsets["train"][mine]

    # Validation is sharded like training: each rank scores its rows, the rows are gathered, and every
    # rank then decides on rank 0's score (`rank0_value`).
    val_mine = list(range(rank, len(enc["val"].ids), world))
    val = enc["val"].subset(val_mine)
    n_lower = int(sum(tune.lengths)) + int(val.lengths.sum())
    bar = _progress(n_lower, f"frozen layers 0-{model.split - 1}" if model.exact_split else "tokenize", rank)
    cache_args = dict(batch_tokens=config.cache_batch_tokens, device=device, progress=bar.update)
    tune_states = lower_cache(model, tune, **cache_args, store=_store(out, f"tune-rank{rank}", len(tune.ids), config))
    val_states = lower_cache(model, val, **cache_args, store=_store(out, f"val-rank{rank}", len(val.ids), config))
    bar.close()

    # Head bias = logit of each medication's training frequency: the first steps then refine a
    # prior instead of unlearning 0.5 for 135 labels of which ~10 are positive. With a frequency
    # prior the offsets already carry the base rates: the head starts at 0, i.e. at the baseline.
    prior = enc["train"].labels[tune_rows].mean(0).clip(1e-4, 1 - 1e-4)
    with torch.no_grad():
        if config.prior == "none":
            model.head.bias.copy_(torch.from_numpy(np.log(prior / (1 - prior))))
        else:
            model.head.bias.zero_()
            model.head.weight.zero_()
    params_lora = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    opt = torch.optim.AdamW(
        [{"params": params_lora, "lr": config.lr}, {"params": list(model.head.parameters()), "lr": config.head_lr}],
        weight_decay=config.weight_decay,
    )
    base_lrs = [config.lr, config.head_lr]
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    batches_per_epoch = len(length_batches(tune.lengths, config.batch_size))
    if world > 1:  # equal step counts on every rank, or DDP's all-reduce waits forever
        n = torch.tensor(batches_per_epoch, device=device)  # NCCL only reduces tensors on the rank's GPU
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
        batches_per_epoch = int(n)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    fingerprint = run_fingerprint(config, model.med_codes, enc)
    state = {"epoch": 0, "step": 0, "best_prauc": -1.0, "best_epoch": 0, "bad": 0, "history": [],
             "fingerprint": fingerprint}
    best = model.trainable_state()
    ckpt = out / "checkpoint"
    found = _checkpoint_seen(ckpt) if resume else None
    if resume and not found:  # said: --resume alone does not show whether it resumed
        log.warning("--resume: no checkpoint in %s; training from epoch 1", ckpt)
    if world > 1 and resume:  # every rank reads the checkpoint itself: all must see the same one
        seen: list = [None] * world
        torch.distributed.all_gather_object(seen, found)
        same_checkpoint_everywhere(seen, ckpt)
    if found:
        written = json.loads((ckpt / "state.json").read_text(encoding="utf-8")).get("fingerprint")
        if written not in (None, fingerprint):  # None: a checkpoint from before fingerprints
            raise StateError(f"--resume: the checkpoint in {ckpt} was written for another dataset, split or teacher "
                             "configuration (it would continue their training as this one's); start without --resume, "
                             "or resume with the options and data it was written with")
        state, best = load_checkpoint(ckpt, model, opt)
        state["fingerprint"] = fingerprint
        log.info("resumed after epoch %d (best validation PRAUC %.4f)", state["epoch"], state["best_prauc"])
    y_val = enc["val"].labels.astype(bool)
    while state["epoch"] < config.epochs and state["bad"] < config.patience:
        epoch = state["epoch"]
        torch.manual_seed(config.seed + 1000 * (epoch + 1) + rank)  # dropout: reproducible on resume
        batches = length_batches(tune.lengths, config.batch_size, seed=config.seed + epoch)[:batches_per_epoch]
        model.train()
        bar = _progress(int(sum(tune.lengths[i] for b in batches for i in b)), f"epoch {epoch + 1}/{config.epochs}", rank)
        t0, seen, losses = time.perf_counter(), 0, []
        for j, batch in enumerate(batches):
            x, lengths = pad_states([tune_states[i] for i in batch])
            y = torch.from_numpy(tune.labels[batch]).to(device)
            sync = (j + 1) % config.grad_accum == 0 or j + 1 == len(batches)
            ctx = train_model.no_sync() if world > 1 and not sync else contextlib.nullcontext()
            with ctx:  # bf16 autocast, when the run is bf16, is the model's own (TeacherModel._precision)
                logits = train_model(x.to(device), lengths.to(device)) + torch.from_numpy(tune_offsets[batch]).to(device)
                loss = F.binary_cross_entropy_with_logits(logits.float(), y)
                (loss / config.grad_accum).backward()
            losses.append(float(loss.detach()))
            seen += int(lengths.sum())
            bar.update(int(lengths.sum()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", tok_s=f"{seen / (time.perf_counter() - t0):.0f}")
            if sync:
                for g, base in zip(opt.param_groups, base_lrs):
                    g["lr"] = base * _lr_factor(state["step"], total_steps, config.warmup)
                opt.step()
                opt.zero_grad(set_to_none=True)
                state["step"] += 1
        bar.close()
        mine_prob, _ = predict(model, val_states, offsets["val"][val_mine], batch_size=config.batch_size * 2, device=device)
        prob = _gather_rows(mine_prob, val_mine, len(enc["val"].ids), world)
        val = metrics.score(y_val, prob, 0.5)
        # Early stopping and the best epoch follow rank 0's score on every rank: ranks whose scores
        # differ by float noise would otherwise stop at different epochs and hang in a collective.
        val["prauc"] = rank0_value(val["prauc"], device)
        state["epoch"] = epoch + 1
        state["history"].append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_prauc": val["prauc"],
                                 "val_jaccard": val["jaccard"], "tokens_per_s": seen / (time.perf_counter() - t0)})
        if val["prauc"] > state["best_prauc"]:
            state.update(best_prauc=val["prauc"], best_epoch=epoch + 1, bad=0)
            best = model.trainable_state()
        else:
            state["bad"] += 1
        log.warning("epoch %d: loss %.4f, validation PRAUC %.4f (best %.4f at epoch %d)", epoch + 1,
                    np.mean(losses), val["prauc"], state["best_prauc"], state["best_epoch"])
        if rank == 0:
            save_checkpoint(ckpt, model, opt, state, best)
        if stop_after_epoch is not None and state["epoch"] >= stop_after_epoch:
            return {}
    model.load_trainable_state(best)
    if world > 1:  # every rank must end with the same adapter; say so if they do not
        digests: list = [None] * world
        torch.distributed.all_gather_object(digests, _digest(best))
        if len(set(digests)) != 1:
            raise RuntimeError(f"DDP ranks ended with different adapters (sha256 {digests}); report this as a bug")
        state["ddp"] = {"world_size": world, "backend": torch.distributed.get_backend(), "adapter_sha256_by_rank": digests}
    if rank != 0:
        return {}
    return _finish(model, ds, enc, offsets, tune_states, val_states, mine, val_mine, out, state, config, device, t_start)


def _checkpoint_seen(ckpt: Path) -> str | None:
    """sha256 of RUN/teacher/checkpoint/state.json as this rank sees it, None without one."""
    from leader_edge.files import sha256

    return sha256(ckpt / "state.json") if (ckpt / "state.json").is_file() else None


def same_checkpoint_everywhere(seen: list[str | None], ckpt: Path) -> None:
    """Refuse a --resume where ranks see different checkpoints (`_checkpoint_seen` of each rank).

    Only rank 0 writes the checkpoint and every rank reads it: with the run directory on each node's
    own disk, the ranks of other nodes see none (or a stale one), would start over, and the ranks
    would hang in a collective or train apart.
    """
    if len(set(seen)) <= 1:
        return
    groups = {}
    for rank, digest in enumerate(seen):
        groups.setdefault("none" if digest is None else digest[:12], []).append(rank)
    raise RuntimeError(f"--resume: the ranks see different checkpoints in {ckpt} (state.json sha256 prefix -> ranks: {groups}); "
                       "on several nodes --out must be on a filesystem every node mounts (NFS, Lustre, ...), "
                       "or start the run again without --resume")


def _digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and bytes of a state dict (order-independent)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _gather_rows(mine: np.ndarray, rows: list[int], n: int, world: int) -> np.ndarray:
    """[n, ...] on every rank from each rank's rows (`rows` of a rank-strided shard)."""
    if world == 1:
        return mine
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, (rows, mine))
    out = np.zeros((n, *mine.shape[1:]), dtype=mine.dtype)
    for r, m in parts:
        out[r] = m
    return out


def _complete(model, encoded: Encoded, have: list[int], states, name: str, out: Path, config: TeacherConfig, args: dict):
    """Every row's frozen states of one split: rows `have` from `states`, the others computed now."""
    from leader_edge.train.state_store import Pick

    where: list = [None] * len(encoded.ids)  # sample -> (0, row in states) or (1, row in the rest)
    for r, i in enumerate(have):
        where[i] = (0, r)
    rest = [i for i, w in enumerate(where) if w is None]
    for j, i in enumerate(rest):
        where[i] = (1, j)
    need = encoded.subset(rest)
    return Pick([states, lower_cache(model, need, **args, store=_store(out, name, len(need.ids), config))], where)


def _finish(model, ds, enc, offsets, tune_states, val_states, mine, val_mine, out: Path, state: dict,
            config: TeacherConfig, device: torch.device, t_start: float) -> dict:
    """Rank 0 after tuning: save the model, the features of every sample, metrics, test predictions."""
    from safetensors.torch import save_file

    from leader_edge.bedside.recs import write_predictions

    model.save(out, extra={"best_epoch": state["best_epoch"]})
    left = int(enc["train"].lengths.sum() - enc["train"].subset(mine).lengths.sum())
    left += int(enc["val"].lengths.sum() - enc["val"].subset(val_mine).lengths.sum()) + int(enc["test"].lengths.sum())
    bar = _progress(left, "frozen layers (rest)", 0)
    args = dict(batch_tokens=config.cache_batch_tokens, device=device, progress=bar.update)
    train_states = _complete(model, enc["train"], mine, tune_states, "rest", out, config, args)
    val_all = _complete(model, enc["val"], val_mine, val_states, "val-rest", out, config, args)
    test_states = lower_cache(model, enc["test"], **args, store=_store(out, "test", len(enc["test"].ids), config))
    bar.close()
    bs = config.batch_size * 2
    _, f_train = predict(model, train_states, offsets["train"], batch_size=bs, device=device)
    p_val, f_val = predict(model, val_all, offsets["val"], batch_size=bs, device=device)
    p_test, f_test = predict(model, test_states, offsets["test"], batch_size=bs, device=device)
    med_codes = model.med_codes
    ddi = metrics.ddi_matrix(ds.ddi, med_codes)
    y_val, y_test = enc["val"].labels.astype(bool), enc["test"].labels.astype(bool)
    threshold = metrics.tune_threshold(y_val, p_val)
    result = {
        "model": "teacher",
        "threshold": threshold,
        "val": metrics.score(y_val, p_val, threshold, ddi),
        "test": metrics.score(y_test, p_test, threshold, ddi),
        "n_params": model.n_params(),
        "inference_ms_per_patient": _time_per_patient(model, enc["test"], config.timing_patients, device),
        "best_epoch": state["best_epoch"],
        "history": state["history"],
        "backbone": {"teacher": config.teacher, "layers": model.n_layers, "lora_layers": model.lora_layers, "prior": config.prior,
                     "hidden_size": model.hidden_size},
        "wall_s": round(time.perf_counter() - t_start, 1),
        **({"ddp": state["ddp"]} if "ddp" in state else {}),
    }
    test = enc["test"]
    write_predictions(out / PREDICTIONS, [s.patient_id for s in test.samples], [s.target.visit_id for s in test.samples],
                      p_test, med_codes, threshold)
    keys = {"train": enc["train"].keys, "val": enc["val"].keys, "test": test.keys}
    from leader_edge.files import atomic_file, atomic_write_text, sha256

    with atomic_file(out / FEATURES) as tmp:  # the umask's mode; a killed run's temp is removed by the next
        save_file({"train": torch.from_numpy(f_train), "val": torch.from_numpy(f_val), "test": torch.from_numpy(f_test)},
                  str(tmp), metadata={"keys": json.dumps(keys), "hidden_size": str(model.hidden_size)})

    # Checked before reuse (`stage_files.load_teacher_features`): a damaged or swapped file is refused.
    result["files"] = {name: sha256(out / name) for name in (FEATURES, ADAPTER, PREDICTIONS)}  # predictions: `evaluate --run`
    atomic_write_text(out / METRICS, json.dumps(result, indent=2) + "\n")  # written last: its presence marks a finished stage
    log.warning("teacher: validation %s, test %s, %.0f s", _short(result["val"]), _short(result["test"]), result["wall_s"])
    return result


def run_fingerprint(config: TeacherConfig, med_codes: list[str], enc: dict) -> str:
    """What a checkpoint must have been written for to be resumed: the teacher configuration (but
    the epoch budget and patience, which a resume may raise), the label space and every split's
    samples. A checkpoint of another dataset was resumed without a word, its epochs counted as this run's."""
    import hashlib

    # Left out: what a resume may raise (epochs, patience) and what changes speed or memory, never the
    # weights (a resume after running out of memory turns on recomputation or the disk cache).
    free = ("epochs", "patience", "timing_patients", "state_cache", "cache_batch_tokens", "gradient_checkpointing")
    settings = {k: v for k, v in config.to_dict().items() if k not in free}
    if Path(str(settings.get("teacher", ""))).exists():  # a model directory named relatively or absolutely
        settings["teacher"] = str(Path(settings["teacher"]).resolve())
    blob = json.dumps({"config": settings, "meds": list(med_codes), "samples": {k: list(e.keys) for k, e in enc.items()}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _short(m: dict) -> str:
    return ", ".join(f"{k} {m[k]:.4f}" for k in ("jaccard", "prauc", "f1") if k in m)


@torch.no_grad()
def _time_per_patient(model: TeacherModel, enc: Encoded, n: int, device: torch.device) -> float:
    """Median ms to score one patient from token ids (batch 1, all layers, no cache)."""
    model.eval()
    times = []
    for ids in enc.ids[:n]:
        x, lengths = pad_batch([ids], model.tokenizer.pad_token_id)
        t = time.perf_counter()
        torch.sigmoid(model(model.lower(x.to(device), lengths.to(device)), lengths.to(device)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000)
    return round(float(np.median(times)), 2) if times else float("nan")
