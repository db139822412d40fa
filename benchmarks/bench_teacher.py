"""Teacher training loop: ours (frozen layers cached once, LoRA on the top layer, last layer at the
scoring token only) vs a plain peft loop (full forward + backward every step, LoRA on all layers).

    .venv/bin/python benchmarks/bench_teacher.py [--samples 32] [--repeats 2]

Same machine, same run, same samples (the first N training prompts of the default synth data,
length-bucketed batches of 8 for every variant). Prints tokens/s of one training epoch (median of
repeats), the one-off cache time, and the extrapolated wall time of a 3-epoch teacher stage on the
full default synth data (2,213 training prompts + 400 val/test prompts, tokens counted).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from leader_edge.data.splits import dataset_splits  # noqa: E402
from leader_edge.data.synth import synth_dataset  # noqa: E402
from leader_edge.train.teacher_config import TeacherConfig  # noqa: E402
from leader_edge.train.teacher_data import encode_samples, length_batches, lower_cache, pad_states  # noqa: E402
from leader_edge.train.teacher_model import TeacherModel  # noqa: E402

VARIANTS = {
    "plain peft, LoRA on all 30 layers": dict(plain=True, lora_layers=30),
    "plain peft, LoRA on top 1 of 30": dict(plain=True, lora_layers=1),
    "ours, 30 layers, LoRA top 1 (cached 29)": dict(lora_layers=1),
    "ours, 12 of 30 layers, LoRA top 1": dict(backbone_layers=12, lora_layers=1),
}


def epoch(model, states, enc, batch_size=8) -> float:
    """Seconds for one training epoch (forward, backward, AdamW step per batch)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    t = time.perf_counter()
    for batch in length_batches(enc.lengths, batch_size, seed=0):
        x, lengths = pad_states([states[i] for i in batch])
        loss = F.binary_cross_entropy_with_logits(model(x, lengths), torch.from_numpy(enc.labels[batch]))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    ds = synth_dataset()
    splits = dataset_splits(ds, train_all_visits=True)
    meds = ds.vocab("medication")
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average at start); torch threads {torch.get_num_threads()}")
    rows = []
    for name, kw in VARIANTS.items():
        model = TeacherModel(TeacherConfig(**kw), meds)
        cfg = model.config
        enc = encode_samples(ds, splits["train"][: args.samples], model.tokenizer, meds,
                             max_history=cfg.max_history, max_tokens=cfg.max_tokens)
        if not rows:  # token counts of the full stage, once (same tokenizer and budget for all)
            counts = {s: int(encode_samples(ds, splits[s], model.tokenizer, meds, max_history=cfg.max_history,
                                            max_tokens=cfg.max_tokens).lengths.sum()) for s in ("train", "val", "test")}
            full, train_tokens = sum(counts.values()), counts["train"]
        tokens = int(enc.lengths.sum())
        t = time.perf_counter()
        states = lower_cache(model, enc, batch_tokens=cfg.cache_batch_tokens, device=torch.device("cpu"))
        cache_s = time.perf_counter() - t
        times = [epoch(model, states, enc) for _ in range(args.repeats)]
        ep = statistics.median(times)
        # A stage = the cache over every prompt once + 3 epochs over the training prompts + features
        # (upper part over every prompt; ~1/3 of a training epoch per token) - plain has no cache.
        stage = cache_s / tokens * full + 3 * ep / tokens * train_tokens + ep / tokens * full / 3
        rows.append((name, cache_s, tokens / ep, stage))
        del model, states
    base = rows[0][2]
    print(f"\n{args.samples} prompts, {tokens} tokens; full stage: {full} tokens ({train_tokens} training)\n")
    print("| loop | one-off cache s | train tokens/s | x plain-all | est. 3-epoch stage s |")
    print("|---|---|---|---|---|")
    for name, cache_s, tps, stage in rows:
        print(f"| {name} | {cache_s:.1f} | {tps:.0f} | {tps / base:.1f} | {stage:.0f} |")


if __name__ == "__main__":
    main()
