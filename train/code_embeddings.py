"""The teacher's view of each code's NAME, as a starting point for the student's code embeddings.

    vectors = name_vectors(names, "smollm2", method="input")      # [N, H], one row per name
    init = pca_init(vectors, fit_rows, dim=64, scale=0.1)          # [N, 64]

Why: a tail ICD-9 code seen ~5 times in training ("Pneumococcal pneumonia") gets almost no gradient
in an ID-only student, while its name tells an LLM which family it belongs to. Starting the
student's embedding of every code from the LLM's representation of its name puts rare codes next
to their frequent relatives; training then only has to move them a little.

Methods:
    "input":  mean of the backbone's input token embeddings over the name's tokens (no forward pass).
    "hidden": masked mean of the hidden states after the first `layers` decoder layers (one forward
              pass over ~1.5k short names).
The full-width vectors are cached in RUN/teacher/code-embeddings.safetensors (tensor "vectors",
metadata "keys" = JSON list of "kind:code", "spec", "method", "layers"), so reruns skip the LLM.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from leader_edge.errors import ConfigError
from leader_edge.files import atomic_file

log = logging.getLogger(__name__)

CODE_EMBEDDINGS = "code-embeddings.safetensors"
METHODS = ("input", "hidden")


@torch.inference_mode()
def name_vectors(names: list[str], spec: str, *, method: str = "input", layers: int = 4, batch_size: int = 128) -> np.ndarray:
    """float32 [len(names), teacher hidden]: the backbone's representation of each name.

    Args:
        names: one string per code (`Dataset.name(kind, code)`).
        spec: a --teacher value ("smollm2", "tiny" or a local directory).
        method: "input" or "hidden" (see the module docstring). layers: decoder layers for "hidden".
    """
    from leader_edge.train.backbone import load_backbone

    if method not in METHODS:
        raise ConfigError(f"code embedding method {method!r}; use one of {METHODS}")
    model, tok = load_backbone(spec, num_layers=1 if method == "input" else layers)
    table = model.get_input_embeddings().weight
    out = []
    for start in range(0, len(names), batch_size):
        enc = tok(names[start : start + batch_size], padding=True, add_special_tokens=False, return_tensors="pt")
        mask = enc["attention_mask"].to(table.dtype)[..., None]  # [B, T, 1]
        if method == "input":
            x = table[enc["input_ids"]]  # [B, T] -> [B, T, H]
        else:
            x = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        out.append(((x * mask).sum(1) / mask.sum(1).clamp(min=1.0)).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, table.shape[1]), dtype=np.float32)


def cached_name_vectors(path: Path, keys: list[str], names: list[str], spec: str, *, method: str, layers: int) -> np.ndarray:
    """`name_vectors`, read from `path` when it holds the same keys, spec and method; else computed and saved."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    meta = {"keys": json.dumps(keys), "spec": spec, "method": method, "layers": str(layers if method == "hidden" else 0)}
    if path.exists():
        with safe_open(str(path), framework="numpy") as f:
            if f.metadata() == meta:
                return f.get_tensor("vectors")
        log.info("%s was computed for other codes or another teacher; recomputing", path)
    vectors = name_vectors(names, spec, method=method, layers=layers).astype(np.float32)
    with atomic_file(path) as tmp:
        save_file({"vectors": vectors}, str(tmp), metadata=meta)
    return vectors


def pca_init(vectors: np.ndarray, fit_rows: np.ndarray, dim: int, scale: float) -> np.ndarray:
    """float32 [N, dim]: `vectors` [N, H] centred and projected on the top `dim` principal axes.

    The axes and the mean come from the rows `fit_rows` (bool [N]: the codes of the training
    split), so validation/test codes never shape them. The result is scaled to overall std `scale`
    (the student's random init has std 0.02). With fewer than `dim` axes the rest are zero.
    """
    fit = vectors[fit_rows].astype(np.float64)
    if len(fit) < 2:
        raise ConfigError(f"PCA needs at least 2 training codes, got {len(fit)}")
    mean = fit.mean(0)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)  # rows of vt: principal axes
    k = min(dim, vt.shape[0])
    out = np.zeros((len(vectors), dim))
    out[:, :k] = (vectors - mean) @ vt[:k].T
    std = out[fit_rows].std()
    return (out * (scale / std if std > 0 else 0.0)).astype(np.float32)
