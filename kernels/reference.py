"""Pure-torch references: the specification of every kernel and its CPU fallback.

Each function here has the same name and signature (minus `backend`) as its public counterpart in
`leader_edge.kernels`. They are written with ops that export to ONNX (padded gather + mask, no
`nn.EmbeddingBag`, no in-place scatter), so the export path keeps calling them directly.

Numerics, shared by the kernels: inputs may be fp32 or bf16; products are accumulated and the
activation/loss evaluated in fp32; results are cast back to the input dtype (the loss stays fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EMBEDDING_BAG_MODES = ("sum", "mean")


def embedding_bag(weight: torch.Tensor, codes: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """Sum or mean of the rows of `weight` named by each bag of `codes`.

    Memory traffic (the reason a fused kernel exists): the gather writes a [B, L, D] tensor and the
    reduction reads it back, 2 * B * L * D elements on top of the B * L * D gathered; the kernel reads
    the gathered rows once and writes only [B, D].

    Args:
        weight: float [V, D] embedding table.
        codes: int64 [B, L] row indices, padded with -1 (any negative value is padding).
        mode: "sum" or "mean"; a bag with no code gives a zero row in both modes.

    Returns:
        [B, D] in `weight.dtype`.
    """
    mask = codes >= 0  # [B, L]
    rows = weight[codes.clamp(min=0)].float()  # [B, L] -> [B, L, D]
    rows = torch.where(mask[..., None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    out = rows.sum(dim=1)  # [B, D]
    if mode == "mean":
        out = out / mask.sum(dim=1, keepdim=True).clamp(min=1).to(out.dtype)
    return out.to(weight.dtype)


def linear_sigmoid(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Probabilities sigmoid(x @ weight.T + bias), matmul accumulated and squashed in fp32.

    Memory traffic: eager writes the [B, M] logits and reads them back for the sigmoid; the kernel
    applies the sigmoid in registers and writes [B, M] once.

    Args:
        x: float [B, D] hidden states.
        weight: [M, D] one row per label.
        bias: [M] or None.

    Returns:
        [B, M] in `x.dtype`.
    """
    logits = F.linear(x.float(), weight.float(), None if bias is None else bias.float())  # [B, M]
    return torch.sigmoid(logits).to(x.dtype)


def linear_bce_with_logits(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor
) -> torch.Tensor:
    """Mean binary cross-entropy of the logits x @ weight.T + bias against `target`.

    Memory traffic: eager keeps the [B, M] logits for backward and writes their gradient; the kernel
    writes only the gradient (and nothing [B, M] at all when no input needs a gradient).

    Args:
        x: float [B, D]; weight: [M, D]; bias: [M] or None.
        target: float [B, M] in [0, 1] (no gradient flows to it).

    Returns:
        fp32 scalar, the mean over all B * M elements.
    """
    logits = F.linear(x.float(), weight.float(), None if bias is None else bias.float())  # [B, M]
    return F.binary_cross_entropy_with_logits(logits, target.detach().float())
