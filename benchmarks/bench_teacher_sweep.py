"""Teacher settings compared on the same frozen states: depth, learning rates, rank, prior.

    .venv/bin/python benchmarks/bench_teacher_sweep.py --data DIR --work /tmp/sweep --depths 4,6,8,11 \
        --config '{"depth": 8}' --config '{"depth": 8, "prior": "frequency"}' ...

One pass of the backbone computes the states after each of `--depths` layers for every train /
validation / test sample (LEADER prompts, `TeacherConfig` defaults) and stores them under --work
(~1 GB per depth on default synth). Each `--config` (TeacherConfig fields plus "depth") then runs the
real teacher stage (`run_teacher_stage`) with `backbone_layers = depth + lora_layers` and its frozen-layer
cache read from those files, which hold exactly what the stage would compute itself: a sweep point
costs training only (~2 min at load ~3 instead of ~6). Prints one JSON line per config.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import leader_edge.train.teacher as teacher
from leader_edge.data.dataset import load_dataset
from leader_edge.data.splits import dataset_splits
from leader_edge.train.teacher_config import TeacherConfig
from leader_edge.train.teacher_data import encode_samples, length_batches, pad_batch
from leader_edge.train.teacher_model import TeacherModel


@torch.no_grad()
def cache_states(data: Path, work: Path, depths: list[int], base: TeacherConfig) -> None:
    """states-<d>.safetensors (sample key -> [L, hidden]) for each depth d, in one forward pass."""
    if all((work / f"states-{d}.safetensors").is_file() for d in depths):
        return
    ds = load_dataset(data)
    meds = ds.vocab("medication")
    splits = dataset_splits(ds, seed=base.seed, train_all_visits=True)
    model = TeacherModel(TeacherConfig(**{**base.to_dict(), "backbone_layers": max(depths) + 1, "lora_layers": 1}), meds).eval()
    out: dict[int, dict[str, torch.Tensor]] = {d: {} for d in depths}
    start = time.perf_counter()
    for name in ("train", "val", "test"):
        enc = encode_samples(ds, splits[name], model.tokenizer, meds, max_history=base.max_history, max_tokens=base.max_tokens)
        for batch in length_batches(enc.lengths, 1 << 30, max_tokens=base.cache_batch_tokens):
            ids, lengths = pad_batch([enc.ids[i] for i in batch], model.tokenizer.pad_token_id)
            hidden, done = model.inner.embed_tokens(ids), 0
            for d in sorted(depths):
                hidden, done = model._layers(hidden, lengths, done, d), d
                for r, i in enumerate(batch):
                    out[d][enc.keys[i]] = hidden[r, : lengths[r]].clone()
    work.mkdir(parents=True, exist_ok=True)
    for d in depths:
        save_file(out[d], str(work / f"states-{d}.safetensors"))
    print(json.dumps({"cached_depths": depths, "seconds": round(time.perf_counter() - start, 1)}), flush=True)


def run_point(data: Path, work: Path, point: dict) -> dict:
    point = dict(point)
    depth = point.pop("depth")
    states = load_file(str(work / f"states-{depth}.safetensors"))
    teacher.lower_cache = lambda model, enc, **_: [states[k] for k in enc.keys]
    start = time.perf_counter()
    tag = hashlib.sha1(json.dumps(point, sort_keys=True).encode()).hexdigest()[:8]
    result = teacher.run_teacher_stage(data, work / f"run-{depth}-{tag}",
                                       TeacherConfig(backbone_layers=depth + point.get("lora_layers", 1), **point))
    return {"depth": depth, **point, "seconds": round(time.perf_counter() - start),
            "val": {k: round(v, 4) for k, v in result["val"].items()},
            "test": {k: round(v, 4) for k, v in result["test"].items()},
            "val_prauc_by_epoch": [round(h["val_prauc"], 4) for h in result["history"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--depths", default="4,6,8,11", help="cached depths (layers below the adapted one)")
    ap.add_argument("--config", action="append", default=[], help='JSON: {"depth": 8, ...TeacherConfig fields}')
    args = ap.parse_args()
    cache_states(args.data, args.work, [int(d) for d in args.depths.split(",")], TeacherConfig())
    for text in args.config or ['{"depth": 8}']:
        print(json.dumps(run_point(args.data, args.work, json.loads(text))), flush=True)


if __name__ == "__main__":
    main()
