"""`leader-edge train --dry-run`: what a teacher run will cost, before any weight is loaded.

    plan = dry_run(data_dir, config, world_size=4, tflops=400.0)   # dict; `format_plan(plan)` for people

Reads the dataset and the model's config.json only (a directory holding config.json alone is
enough: the model is built on torch's "meta" device, which has shapes and no storage). Reports
prompts and tokens per split (tokenized when the model directory or builtin has a tokenizer,
otherwise estimated at 4 characters per token, and said so), parameters, trainable parameters
(LoRA on the top `lora_layers` layers + the medication head), memory per GPU rank and on the host,
and time per epoch from a stated throughput. The memory and time figures are estimates from the
formulas below, not measurements; users decide how many GPUs to rent from them.

    weights per rank         params x bytes of `backbone.weight_dtype(bf16)`      (2 bf16, 4 fp32: the dtype
                             `load_backbone` loads them in; DDP: a full copy per rank)
    trainable state          trainable x 16 bytes                             (fp32 weight, grad, Adam m and v)
    activations per rank     batch x longest prompt x hidden x adapted layers x 34 bytes
                             (bf16, per layer per token; Korthikanti et al. 2022, no recomputation);
                             with gradient checkpointing: batch x longest x hidden x (2 x layers + 34) bytes
    frozen-state cache       tokens x 8 bytes (int64 ids) when every layer is adapted, else tokens x hidden x
                             (2 bf16 | 4 fp32) bytes: on disk with `state_cache="disk"` (the default), in host
                             memory with "memory"
    host memory per rank     the weights again (each rank builds the body on the host, then moves it to
                             its GPU) + token tables (every rank encodes every split: ~40 bytes per token,
                             a Python int and its list slot) + labels and prior offsets (2 x prompts x
                             medications x 4 bytes) + the frozen-state buffer (disk: one shard being
                             written + one batch of states; memory: the rank's share of the cache)
    host memory per node     ranks per node x per rank + rank 0's extra at the end (features of every
                             prompt, prompts x hidden x 4 bytes; memory cache: the rest of the cache)
    time per epoch           6 x adapted-part params x training tokens / (tflops x 1e12 x world size)
                             + 2 x frozen-part params x tokens once (the frozen pass)
"""

from __future__ import annotations

import math
from pathlib import Path

ACT_BYTES_PER_TOKEN_LAYER = 34  # x hidden, bf16 activations of one transformer layer (Korthikanti et al. 2022)
CHARS_PER_TOKEN = 4.0  # estimate when no tokenizer is available
# Host bytes per prompt token in `Encoded.ids` (list[list[int]]): an 8-byte list slot + a 28-byte int
# object in a 32-byte block (ids above 256 are not interned; real vocabularies are 32k-150k).
# tracemalloc on 2,000 lists of 500 ids in 1..32000, built as encode_prompt builds them: 39.8 bytes per id.
TOKEN_TABLE_BYTES = 40


def _meta_model(spec: str):
    """(decoder body on the meta device, tokenizer or None) for a --teacher value."""
    import torch
    from transformers import AutoConfig, AutoModel

    from leader_edge.train.backbone import load_tokenizer, resolve, smollm2_dir, tiny_model

    spec = resolve(spec)
    if spec == "tiny":
        tok = load_tokenizer(spec)
        return tiny_model(len(tok)), tok
    path = smollm2_dir() if spec == "smollm2" else Path(spec)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    try:
        tok = load_tokenizer(spec)
    except (OSError, ValueError):  # config.json alone: no tokenizer files
        tok = None
    return model, tok


def dry_run(data_dir: Path, config, *, world_size: int = 1, ranks_per_node: int | None = None, tflops: float = 400.0,
            sample: int = 500) -> dict:
    """The plan of a teacher run (see the module docstring); `config` is a TeacherConfig.

    Args:
        ranks_per_node: processes (GPUs) per node for the host-memory figure; None: `world_size` (one node).
    """
    from leader_edge.data.dataset import load_dataset
    from leader_edge.data.splits import dataset_splits
    from leader_edge.train.prompts import build_prompt
    from leader_edge.train.backbone import decoder_layers, weight_dtype
    from leader_edge.train.state_store import SHARD_BYTES
    from leader_edge.train.teacher_data import encode_prompt
    from leader_edge.train.teacher_model import state_split

    ds = load_dataset(data_dir)
    splits = dataset_splits(ds, seed=config.seed, train_all_visits=True, protocol=config.protocol)
    model, tok = _meta_model(config.teacher)
    layers = decoder_layers(model)
    n_layers = len(layers) if config.backbone_layers is None else min(config.backbone_layers, len(layers))
    hidden = int(model.config.hidden_size)
    n_meds = len(ds.vocab("medication"))
    tokens = {}
    for name, samples in splits.items():
        step = max(1, len(samples) // sample)
        picked = samples[::step]
        if tok is not None:
            counts = [len(encode_prompt(ds, s, tok, max_history=config.max_history, max_tokens=config.max_tokens)) for s in picked]
        else:
            def estimate(text: str) -> int:
                return math.ceil(len(text) / CHARS_PER_TOKEN) + 1

            counts = [estimate(build_prompt(ds, s, max_history=config.max_history, max_tokens=config.max_tokens,
                                            count_tokens=estimate)) for s in picked]
        mean = sum(counts) / max(len(counts), 1)
        tokens[name] = {"prompts": len(samples), "tokens": int(round(mean * len(samples))), "mean_tokens": round(mean, 1),
                        "max_tokens_seen": max(counts, default=0)}
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers[:n_layers]]
    other = sum(p.numel() for p in model.parameters()) - sum(sum(p.numel() for p in layer.parameters()) for layer in layers)
    params = other + sum(per_layer)
    lora_layers = config.adapted_layers(n_layers)  # refuses a count above the model's depth, as the run does
    lora = 0
    for layer in layers[n_layers - lora_layers:n_layers]:
        for name, module in layer.named_modules():
            if name.split(".")[-1] in config.lora_targets and hasattr(module, "in_features"):
                lora += config.lora_r * (module.in_features + module.out_features)
    head = hidden * n_meds + n_meds
    trainable = lora + head
    adapted = sum(per_layer[n_layers - lora_layers:]) + (other if lora_layers == n_layers else 0)
    frozen = params - adapted
    bytes_w = weight_dtype(config.bf16).itemsize  # what load_backbone loads (and the disk store keeps)
    train_tokens = tokens["train"]["tokens"]
    all_tokens = sum(t["tokens"] for t in tokens.values())
    all_prompts = sum(t["prompts"] for t in tokens.values())
    micro = config.batch_size
    longest = min(config.max_tokens, max(t["max_tokens_seen"] for t in tokens.values()))
    gib = 1024 ** 3
    mem = {
        "weights_gib": params * bytes_w / gib,
        "trainable_state_gib": trainable * 16 / gib,
        # batches are length-bucketed: the longest prompt (within max_tokens) bounds a micro-batch;
        # with recomputation only each layer's bf16 input stays, plus one layer's full activations
        "activations_gib": micro * longest * hidden * (
            (2 * lora_layers + ACT_BYTES_PER_TOKEN_LAYER) if config.gradient_checkpointing
            else lora_layers * ACT_BYTES_PER_TOKEN_LAYER) / gib,
    }
    mem["gpu_per_rank_gib"] = sum(mem.values())
    states = state_split(model, config, n_layers)[1] > 0  # else the cache holds token ids
    cache = all_tokens * (hidden * bytes_w if states else 8)
    mem["cache_gib"] = cache / gib
    # Host, per rank: what it holds while loading and caching (see the module docstring).
    tune_share = (train_tokens + tokens["val"]["tokens"]) / max(all_tokens, 1) * cache / world_size
    if config.state_cache == "disk":
        buffer = min(SHARD_BYTES, tune_share) + config.cache_batch_tokens * (hidden * bytes_w if states else 8)
    else:
        buffer = tune_share
    host = {
        "host_weights_gib": params * bytes_w / gib,
        "host_tables_gib": (all_tokens * TOKEN_TABLE_BYTES + 2 * all_prompts * n_meds * 4) / gib,
        "host_state_buffer_gib": buffer / gib,
    }
    host["host_per_rank_gib"] = sum(host.values())
    per_node = ranks_per_node or world_size
    rank0_extra = all_prompts * hidden * 4 + (cache - tune_share if config.state_cache == "memory" else 0)
    host["host_rank0_extra_gib"] = rank0_extra / gib
    host["host_per_node_gib"] = per_node * host["host_per_rank_gib"] + host["host_rank0_extra_gib"]
    mem.update(host)
    flops_epoch = 6 * adapted * train_tokens
    flops_frozen = 2 * frozen * all_tokens
    rate = tflops * 1e12 * world_size
    return {
        "teacher": config.teacher, "state_cache": config.state_cache, "world_size": world_size,
        "gradient_checkpointing": config.gradient_checkpointing, "layers": n_layers, "lora_layers": lora_layers,
        "hidden_size": hidden, "medications": n_meds, "tokenizer": tok is not None, "splits": tokens,
        "parameters": params, "trainable_parameters": trainable,
        "weight_dtype": str(weight_dtype(config.bf16)).replace("torch.", ""), "weight_bytes": params * bytes_w,
        "ranks_per_node": per_node, "cache_holds": "states" if states else "token ids",
        "effective_batch": config.batch_size * config.grad_accum * world_size,
        "optimizer_steps_per_epoch": math.ceil(tokens["train"]["prompts"] / (config.batch_size * config.grad_accum * world_size)),
        "memory": {k: round(v, 3) for k, v in mem.items()},
        "assumed_tflops_per_gpu": tflops,
        "frozen_pass_minutes": round(flops_frozen / rate / 60, 2),
        "epoch_minutes": round(flops_epoch / rate / 60, 2),
        "epochs": config.epochs,
    }


def format_plan(plan: dict) -> str:
    """The plan as a few lines for a terminal."""
    m = plan["memory"]
    lines = [f"teacher {plan['teacher']}: {plan['layers']} layers (LoRA on {plan['lora_layers']}), hidden {plan['hidden_size']}, "
             f"{plan['medications']} medications; world size {plan['world_size']}, effective batch {plan['effective_batch']}, "
             f"{plan['optimizer_steps_per_epoch']} optimizer steps per epoch"]
    how = "tokenized (a sample of prompts, scaled)" if plan["tokenizer"] else f"ESTIMATED at {CHARS_PER_TOKEN:g} characters per token (no tokenizer)"
    for name, t in plan["splits"].items():
        lines.append(f"  {name:<5} {t['prompts']:>8,} prompts  {t['tokens']:>12,} tokens  (mean {t['mean_tokens']}, max seen "
                     f"{t['max_tokens_seen']}; {how})")
    lines += [f"parameters {plan['parameters']:,}; trainable {plan['trainable_parameters']:,} (LoRA + head)",
              f"GPU memory per rank (estimate): {m['gpu_per_rank_gib']:.2f} GiB = weights {m['weights_gib']:.2f} "
              f"({plan['weight_dtype']}) + trainable "
              f"state {m['trainable_state_gib']:.2f} + activations {m['activations_gib']:.2f} (micro-batch, "
              + ("gradient checkpointing)" if plan["gradient_checkpointing"] else "no recomputation)"),
              f"frozen-state cache: {m['cache_gib']:.2f} GiB of {plan['cache_holds']} "
              + ("on disk" if plan["state_cache"] == "disk" else "in host memory"),
              f"host memory per node (estimate, {plan['ranks_per_node']} rank{'s' if plan['ranks_per_node'] != 1 else ''} per node): {m['host_per_node_gib']:.2f} GiB = "
              f"{plan['ranks_per_node']} x {m['host_per_rank_gib']:.2f} per rank (weights {m['host_weights_gib']:.2f} in "
              f"{plan['weight_dtype']}, built on the host before moving to the GPU + token and label tables "
              f"{m['host_tables_gib']:.2f} + frozen-state buffer {m['host_state_buffer_gib']:.2f}) + rank 0's features at the end "
              f"{m['host_rank0_extra_gib']:.2f}",
              f"time at {plan['assumed_tflops_per_gpu']:g} TFLOP/s per GPU (assumed): frozen pass {plan['frozen_pass_minutes']:.1f} min, "
              f"{plan['epoch_minutes']:.1f} min per epoch, up to {plan['epochs']} epochs"]
    return "\n".join(lines)
