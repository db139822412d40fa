"""Peak host memory of the teacher's frozen-layer cache as the prompts grow: disk shards vs a list.

    python benchmarks/bench_teacher_memory.py [--hidden 2048] [--patients 60,240] [--max-tokens 96]

A random Llama-style body (hidden 2048 by default, 2 layers, the lower one frozen) is saved to a
temporary directory with the byte tokenizer; each case runs in a fresh process that builds the
teacher and computes the frozen states of every training prompt of a synthetic cohort through
`lower_cache`, once into a `StateStore` on disk (`state_cache="disk"`, the default) and once into a
list (`"memory"`). It prints peak RSS (ru_maxrss) per case and the growth from the smallest
cohort to the 4x one; the stores' growth should be ~0 while the list's grows with tokens x hidden.
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
import torch
from leader_edge.data.dataset import write_dataset
from leader_edge.data.splits import dataset_splits
from leader_edge.data.synth import synth_dataset
from leader_edge.train.teacher import _store
from leader_edge.train.teacher_config import TeacherConfig
from leader_edge.train.teacher_data import encode_samples, lower_cache
from leader_edge.train.teacher_model import TeacherModel
model_dir, patients, cache, max_tokens, work = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(2)
ds = synth_dataset(patients=patients, seed=1)
train = dataset_splits(ds, train_all_visits=True)["train"]
config = TeacherConfig(teacher=model_dir, lora_layers=1, max_tokens=max_tokens, state_cache=cache)
model = TeacherModel(config, ds.vocab("medication")).eval()
enc = encode_samples(ds, train, model.tokenizer, model.med_codes, max_history=3, max_tokens=max_tokens)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
from pathlib import Path
states = lower_cache(model, enc, batch_tokens=4096, device=torch.device("cpu"), store=_store(Path(work), "bench", len(enc.ids), config))
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"prompts": len(enc.ids), "tokens": int(enc.lengths.sum()), "base_mb": base / 1024, "peak_mb": peak / 1024,
                  "seconds": seconds}))
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--patients", default="60,240")
    p.add_argument("--max-tokens", type=int, default=96)
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
        for cache in ("disk", "memory"):
            for patients in [int(x) for x in a.patients.split(",")]:
                work = Path(tmp) / f"work-{cache}-{patients}"
                out = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), str(patients), cache, str(a.max_tokens), str(work)],
                                     capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if out.returncode != 0:
                    sys.exit(out.stderr[-2000:])
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append({"cache": cache, "patients": patients, **r})
                print(f"{cache:<7} {patients:>5} patients {r['prompts']:>5} prompts {r['tokens']:>8,} tokens  "
                      f"peak RSS {r['peak_mb']:8.0f} MB (before the pass {r['base_mb']:.0f})  {r['seconds']:.1f} s", flush=True)
        for cache in ("disk", "memory"):
            small, big = [r for r in rows if r["cache"] == cache][:2]
            print(f"{cache}: tokens x{big['tokens'] / small['tokens']:.1f} -> peak RSS growth during the pass "
                  f"{(big['peak_mb'] - big['base_mb']) - (small['peak_mb'] - small['base_mb']):+.0f} MB")


if __name__ == "__main__":
    main()
