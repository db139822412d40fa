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


def _head_logits(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor | None,
    codes: torch.Tensor | None, extra: torch.Tensor | None,
) -> torch.Tensor:
    """fp32 [B, M] logits h @ weight.T + bias + wide max + extra (see `wide_max_head`)."""
    logits = F.linear(h.float(), weight.float(), None if bias is None else bias.float())  # [B, M]
    if table is not None and codes.shape[1]:
        mask = codes >= 0  # [B, L]
        rows = table[codes.clamp(min=0)].float()  # [B, L] -> [B, L, M]: the gather the kernel never builds
        best = torch.where(mask[..., None], rows, float("-inf")).amax(dim=1)  # [B, M]
        logits = logits + torch.where(mask.any(dim=1, keepdim=True), best, 0.0)
    if extra is not None:
        logits = logits + extra.float()
    return logits


def wide_max_head(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor | None,
    codes: torch.Tensor | None, extra: torch.Tensor | None = None, sigmoid: bool = False,
) -> torch.Tensor:
    """The student's scoring head: h @ weight.T + bias + max over the bag's codes of their rows of
    `table` + `extra`, optionally squashed by a sigmoid; everything in fp32.

    Memory traffic: eager gathers a [B, L, M] tensor of wide rows, writes it, reads it for the max,
    then writes and re-reads [B, M] logits for each addition and the sigmoid; the kernel reads each
    gathered row slice once into registers and writes [B, M] once. Backward: amax splits a slot's
    gradient evenly among the slots tied at the max (repeated codes count once per slot).

    Args:
        h: float [B, D] hidden states. weight: [M, D]. bias: [M] or None.
        table: float [V, M] per-code logit rows (the wide path), or None for the linear head alone.
        codes: int64 [B, L] rows of `table`, -1 padded (any negative is padding); a bag without a
            code adds 0. Ignored when `table` is None.
        extra: float [B, M] per-row logits added last (the counting prior), or None.
        sigmoid: return probabilities instead of logits.

    Returns:
        [B, M] in `h.dtype`.
    """
    logits = _head_logits(h, weight, bias, table, codes, extra)
    return (torch.sigmoid(logits) if sigmoid else logits).to(h.dtype)


def wide_max_head_loss(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor | None,
    codes: torch.Tensor | None, extra: torch.Tensor | None, target: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean BCE-with-logits of `wide_max_head`'s logits against `target` [B, M] (fp32 scalar),
    fp32 [B, M] probabilities without gradient). Memory traffic: eager keeps the logits and the
    [B, L, M] gather for backward; the kernel keeps the probabilities and the max (and its tie count)."""
    logits = _head_logits(h, weight, bias, table, codes, extra)
    return F.binary_cross_entropy_with_logits(logits, target.detach().float()), torch.sigmoid(logits).detach()
