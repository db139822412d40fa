"""Peak host memory of the whole teacher stage as the prompts grow 4x: frozen states on disk vs in a list.

    python benchmarks/bench_teacher_memory.py [--hidden 2048] [--patients 60,260] [--shard-mb 16] [--epochs 1]

A random Llama-style body (hidden 2048 by default, 2 layers, the lower one frozen, LoRA on the top
one) is saved to a temporary directory with the byte tokenizer. Each case runs `run_teacher_stage`
in a fresh process on a synthetic cohort - the frozen pass, the training epochs, validation, the
rest of the frozen states, features, metrics and test predictions - once with the states in a
`StateStore` on disk (`state_cache="disk"`, the default) and once in a list (`"memory"`). The
store's shard size is lowered (`--shard-mb`, default 16 MiB instead of 256) so that even the small
cohort spans many shards: host memory is then bounded by a shard, and the growth from the small
cohort to the 4x one shows whether anything else grows with the data. It prints peak RSS
(ru_maxrss) per case, the shards written, and the growth; the store's should be ~0 beyond what the
longest prompt adds to a batch (batches are length-bucketed: their size follows the longest prompt),
the list's tokens x hidden x 4 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import torch
from leader_edge.data.dataset import write_dataset
from leader_edge.data.synth import synth_dataset
from leader_edge.train import state_store
from leader_edge.train.teacher import run_teacher_stage
from leader_edge.train.teacher_config import TeacherConfig
model_dir, patients, cache, max_tokens, work, shard_mb, epochs = sys.argv[1:8]
state_store.SHARD_BYTES = int(float(shard_mb) * 1024 * 1024)
shards = []
flush = state_store.StateStore._flush
def counting_flush(self):
    shards.append(bool(self._pending))
    flush(self)
state_store.StateStore._flush = counting_flush
torch.set_num_threads(2)
data = write_dataset(synth_dataset(patients=int(patients), seed=1), Path(work) / "data", source="synth")
config = TeacherConfig(teacher=model_dir, lora_layers=1, max_tokens=int(max_tokens), state_cache=cache,
                       epochs=int(epochs), timing_patients=1)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
result = run_teacher_stage(data, Path(work) / "run", config)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from safetensors import safe_open
with safe_open(str(Path(work) / "run" / "teacher" / "features.safetensors"), "pt") as f:
    prompts = sum(f.get_slice(k).get_shape()[0] for k in ("train", "val", "test"))
from leader_edge.data.dataset import load_dataset
from leader_edge.data.splits import dataset_splits
from leader_edge.train.teacher_data import encode_samples
from leader_edge.train.backbone import load_tokenizer
ds = load_dataset(data)
tok = load_tokenizer(model_dir)
lengths = [encode_samples(ds, s, tok, ds.vocab("medication"), max_history=3, max_tokens=int(max_tokens)).lengths
           for s in dataset_splits(ds, train_all_visits=True).values()]
tokens, longest = sum(int(n.sum()) for n in lengths), max(int(n.max()) for n in lengths)
print(json.dumps({"prompts": prompts, "tokens": tokens, "longest": longest, "shards": sum(shards), "base_mb": base / 1024, "peak_mb": peak / 1024,
                  "seconds": seconds, "val_prauc": result["val"]["prauc"]}))
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--patients", default="60,260", help="cohort sizes; 60 and 260 give 87 and 346 prompts (3.98x)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--shard-mb", type=float, default=16.0, help="StateStore shard size (the stage's default is 256 MiB)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--caches", default="disk,memory")
    a = p.parse_args(argv)
    import torch
    import transformers

    from leader_edge.train.backbone import tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "wide"
        tok = tiny_tokenizer()
        n = len(tok)
        cfg = transformers.LlamaConfig(vocab_size=n, hidden_size=a.hidden, intermediate_size=a.hidden, num_hidden_layers=2,
                                       num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
                                       pad_token_id=n - 2, eos_token_id=n - 1)
        torch.manual_seed(0)
        transformers.AutoModel.from_config(cfg).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        rows = []
        for cache in a.caches.split(","):
            for patients in [int(x) for x in a.patients.split(",")]:
                work = Path(tmp) / f"work-{cache}-{patients}"
                args = [str(model_dir), str(patients), cache, str(a.max_tokens), str(work), str(a.shard_mb), str(a.epochs)]
                out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", "LEADER_EDGE_QUIET": "1"})
                if out.returncode != 0:
                    sys.exit(out.stderr[-2000:])
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append({"cache": cache, "patients": patients, **r})
                print(f"{cache:<7} {patients:>5} patients {r['prompts']:>5} prompts {r['tokens']:>8,} tokens (longest {r['longest']}) "
                      f"{r['shards']:>4} shards  "
                      f"peak RSS {r['peak_mb']:8.0f} MB (before the stage {r['base_mb']:.0f})  {r['seconds']:.1f} s", flush=True)
        for cache in a.caches.split(","):
            small, big = [r for r in rows if r["cache"] == cache][:2]
            print(f"{cache}: prompts x{big['prompts'] / small['prompts']:.2f}, tokens x{big['tokens'] / small['tokens']:.2f} -> "
                  f"peak RSS {small['peak_mb']:.0f} -> {big['peak_mb']:.0f} MB ({big['peak_mb'] - small['peak_mb']:+.0f} MB)")


if __name__ == "__main__":
    main()
