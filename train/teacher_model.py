"""LEADER(T): a decoder LLM with LoRA and a medication head on the last prompt token.

The body is split at layer `split = n_layers - lora_layers`:
- `lower(ids)`: embeddings + layers[:split], frozen, run once per sample under no_grad. Exact:
  with right padding and causal attention a token's state depends only on the tokens before it,
  so each sample's unpadded states [L, hidden] are cached and later batched with any padding.
- `upper(hidden, lengths)`: layers[split:] (LoRA) + final norm, at the last token. The LAST layer
  only needs its output at that token: keys/values for all tokens, but query, attention output
  and MLP for one token (~6% of a full layer per token for SmolLM2), exact again.
Bodies without the Llama layout (GPT-2) and the `plain` benchmark baseline run the full body
forward on token ids instead.

Precision: in a bf16 run (`config.bf16`) the frozen weights are bf16 (`backbone.weight_dtype`), the
LoRA adapters and the head fp32 (peft upcasts adapters of a bf16 base to fp32), and `lower`,
`features` and `forward` run under bf16 autocast on any device; an fp32 run is fp32 throughout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from leader_edge.errors import ConfigError, StateError
from leader_edge.train.backbone import decoder_layers, is_llama_style, load_backbone, weight_dtype
from leader_edge.train.teacher_config import TeacherConfig

log = logging.getLogger(__name__)

ADAPTER = "adapter.safetensors"
CONFIG = "config.json"


def state_split(body: nn.Module, config: TeacherConfig, n_layers: int) -> tuple[bool, int]:
    """(exact, split): whether the body splits exactly (Llama layout, not the `plain` baseline) and the
    layer it splits at (layers[:split] frozen, their states cached; 0 when it does not split or every
    layer is tuned: then the cache holds token ids). `train --dry-run` plans the cache by this too."""
    exact = is_llama_style(body) and not config.plain
    return exact, (n_layers - config.adapted_layers(n_layers) if exact else 0)


class TeacherModel(nn.Module):
    """Body (peft LoRA on the top `lora_layers`) + `Linear(hidden, n_meds)` head.

    Args:
        config: the teacher configuration.
        med_codes: M medication codes, the head's output order.
    """

    def __init__(self, config: TeacherConfig, med_codes: list[str]) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.config = config
        self.med_codes = list(med_codes)
        body, self.tokenizer = load_backbone(config.teacher, num_layers=config.backbone_layers,
                                             dtype=weight_dtype(config.bf16))
        layers = decoder_layers(body)
        self.n_layers = len(layers)
        self.lora_layers = config.adapted_layers(self.n_layers)  # "all" -> n_layers
        self.exact_split, self.split = state_split(body, config, self.n_layers)
        present = {n.rsplit(".", 1)[-1] for n, m in body.named_modules() if isinstance(m, nn.Linear)}
        targets = [t for t in config.lora_targets if t in present]
        if not targets:
            raise ConfigError(f"none of the LoRA targets {list(config.lora_targets)} exist in {config.teacher}; its linear layers are {sorted(present)}")
        lora = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=targets,
            layers_to_transform=list(range(self.n_layers - self.lora_layers, self.n_layers)),
            layers_pattern="layers" if hasattr(body, "layers") else "h",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # LoRA A matrices: same init on every rank and rerun
            with warnings.catch_warnings():  # transformers' deprecation of a name peft still calls: nothing to act on
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                self.body = get_peft_model(body, lora)
            self.hidden_size = int(body.config.hidden_size)
            self.head = nn.Linear(self.hidden_size, len(self.med_codes))  # bias: medication priors

    def _precision(self, x: torch.Tensor):
        """bf16 autocast around a forward in a bf16 run (mixed bf16 weights / fp32 adapters and head), else nothing."""
        if not self.config.bf16:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=torch.bfloat16)

    @property
    def inner(self):
        """The decoder body inside the peft wrapper (its layers carry the LoRA modules)."""
        return self.body.get_base_model()

    # -----------------------------------------------------------------------------------------
    # The frozen lower part, once per sample.

    @torch.no_grad()
    def lower(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """States after layers[:split] of a right-padded batch.

        Args:
            ids: [B, T] int64 token ids (right padded).
            lengths: [B] int64 number of real tokens.

        Returns:
            [B, T, hidden] float32, bf16 in a bf16 run (pad positions hold garbage; slice [:length]). With every layer
            adapted (split 0), the ids themselves. For a body that
            is not split, the ids themselves as [B, T] (the upper part embeds them).
        """
        if not self.exact_split or self.split == 0:
            return ids  # nothing frozen: caching embeddings would cost T x hidden floats per prompt for nothing
        with self._precision(ids):
            hidden = self.inner.embed_tokens(ids)
            return self._layers(hidden, lengths, 0, self.split)

    def _mask_and_positions(self, hidden: torch.Tensor, lengths: torch.Tensor):
        from transformers.masking_utils import create_causal_mask

        b, t = hidden.shape[:2]
        pos = torch.arange(t, device=hidden.device).unsqueeze(0).expand(b, -1)  # [B, T]
        valid = (pos < lengths.unsqueeze(1)).long()  # [B, T]
        mask = create_causal_mask(
            config=self.inner.config, inputs_embeds=hidden, attention_mask=valid, cache=None, position_ids=pos
        )
        return mask, pos, self.inner.rotary_emb(hidden, position_ids=pos)

    def _layers(self, hidden: torch.Tensor, lengths: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if stop <= start:
            return hidden
        mask, pos, rope = self._mask_and_positions(hidden, lengths)
        recompute = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.inner.layers[start:stop]:
            if recompute:  # keep only each layer's input; its activations are recomputed in backward
                from torch.utils.checkpoint import checkpoint

                hidden = checkpoint(layer, hidden, attention_mask=mask, position_embeddings=rope, position_ids=pos,
                                    use_reentrant=False)
            else:
                hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, position_ids=pos)
        return hidden

    # -----------------------------------------------------------------------------------------
    # The trained upper part.

    def features(self, lower: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The final-norm hidden state at the last real token (LEADER's distillation target).

        Args:
            lower: [B, T, hidden] from `lower` (or [B, T] token ids for an unsplit body).
            lengths: [B] real tokens per row (the last one is the appended EOS).

        Returns:
            [B, hidden] float32 (in a bf16 run too: the distillation target and the head's input).
        """
        with self._precision(lower):
            return self._features(lower, lengths).float()

    def _features(self, lower: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(lengths.shape[0], device=lengths.device)
        if not self.exact_split:
            t = lower.shape[1]
            valid = (torch.arange(t, device=lower.device).unsqueeze(0) < lengths.unsqueeze(1)).long()
            out = self.body(input_ids=lower, attention_mask=valid).last_hidden_state
            return out[rows, lengths - 1]
        if not lower.is_floating_point():  # token ids: every layer is adapted (split 0)
            lower = self.inner.embed_tokens(lower)
        hidden = self._layers(lower, lengths, self.split, self.n_layers - 1)
        _, _, rope = self._mask_and_positions(hidden, lengths)
        last = _last_token_layer(self.inner.layers[self.n_layers - 1], hidden, lengths, rope)
        return self.inner.norm(last)

    def forward(self, lower: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Medication logits [B, M] (train on logits, serve sigmoid probabilities)."""
        with self._precision(lower):
            return self.head(self._features(lower, lengths))

    # -----------------------------------------------------------------------------------------
    # Save / load: LoRA + head in one safetensors file, the config in JSON.

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """LoRA weights (peft names) and the head, detached copies."""
        from peft import get_peft_model_state_dict

        state = {f"lora.{k}": v for k, v in get_peft_model_state_dict(self.body).items()}
        state.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return {k: v.detach().clone().contiguous() for k, v in state.items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        lora = {k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")}
        result = set_peft_model_state_dict(self.body, lora)
        if getattr(result, "unexpected_keys", None):
            raise StateError(f"adapter has unexpected LoRA tensors {result.unexpected_keys[:3]}; was it saved by a different config?")
        self.head.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})

    def save(self, directory: Path, extra: dict | None = None) -> None:
        """Write `adapter.safetensors` and `config.json` into `directory` (each via temp + rename)."""
        from safetensors.torch import save_file

        from leader_edge.files import atomic_file, atomic_write_text

        directory.mkdir(parents=True, exist_ok=True)
        with atomic_file(directory / ADAPTER) as tmp:
            save_file(self.trainable_state(), str(tmp), metadata={"format": "leader-edge-teacher"})
        meta = {"teacher": self.config.to_dict(), "med_codes": self.med_codes, "hidden_size": self.hidden_size,
                "n_layers": self.n_layers, "split": self.split, **(extra or {})}
        atomic_write_text(directory / CONFIG, json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "TeacherModel":
        """Rebuild a saved teacher (backbone from its --teacher spec, LoRA + head from the file)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / ADAPTER).is_file():
            raise StateError(f"{directory} has no {ADAPTER}; run `leader-edge train --stage teacher` first")
        meta = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
        model = cls(TeacherConfig.from_dict(meta["teacher"]), meta["med_codes"])
        model.load_trainable_state(load_file(str(directory / ADAPTER)))
        return model.eval()

    def n_params(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"total": total, "trainable": trainable}


def _last_token_layer(layer: nn.Module, hidden: torch.Tensor, lengths: torch.Tensor, rope) -> torch.Tensor:
    """A Llama-style decoder layer evaluated at each row's last real token only.

    Args:
        layer: decoder layer (input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp).
        hidden: [B, T, hidden] input states.
        lengths: [B] real tokens; the query is at lengths - 1 and sees keys [0, lengths).
        rope: (cos, sin), each [B, T, head_dim].

    Returns:
        [B, hidden], equal to the full layer's output at that token.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    b, t, _ = hidden.shape
    d = attn.head_dim
    rows = torch.arange(b, device=hidden.device)
    x = layer.input_layernorm(hidden)  # [B, T, hidden]
    q = attn.q_proj(x[rows, lengths - 1].unsqueeze(1)).view(b, 1, -1, d).transpose(1, 2)  # [B, heads, 1, d]
    k = attn.k_proj(x).view(b, t, -1, d).transpose(1, 2)  # [B, kv_heads, T, d]
    v = attn.v_proj(x).view(b, t, -1, d).transpose(1, 2)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3 normalises q and k per head
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = rope
    idx = (lengths - 1).view(b, 1, 1).expand(-1, 1, d)
    q, _ = apply_rotary_pos_emb(q, q, cos.gather(1, idx), sin.gather(1, idx))
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # [B, heads, T, d]
    v = v.repeat_interleave(groups, dim=1)
    keys_ok = (torch.arange(t, device=hidden.device).unsqueeze(0) < lengths.unsqueeze(1)).view(b, 1, 1, t)
    drop = attn.attention_dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys_ok, dropout_p=drop, scale=attn.scaling)  # [B, heads, 1, d]
    out = attn.o_proj(out.transpose(1, 2).reshape(b, -1))  # [B, hidden]
    res = hidden[rows, lengths - 1] + out
    return res + layer.mlp(layer.post_attention_layernorm(res))
