"""Triton wide-max head: the student's whole scoring head in one pass, forward and backward.

Specification: `leader_edge.kernels.reference.wide_max_head`. Loaded lazily by `leader_edge.kernels`.
Each [BLOCK_B, BLOCK_M] tile computes h @ W.T + b in registers, then walks the bag's L code slots
gathering one [BLOCK_B, BLOCK_M] slice of their wide rows at a time (a running max and the number
of slots that reach it), adds the per-row extra logits, and ends in the fp32 epilogue: logits,
sigmoid, or (loss mode) BCE partial sums and probabilities. The [B, L, M] gather eager builds never
exists. Backward: dh, dW, db by cuBLAS on dlogits; the wide table's gradient by a scatter kernel
that re-reads the same slices and adds dlogits / count to every slot equal to the saved max (torch's
amax splits the gradient evenly among tied slots, so this is its exact rule, repeated codes included).

The table's gradient, as `triton_embedding_bag`'s, by one of two kernels picked by
`torch.are_deterministic_algorithms_enabled()`: atomic fp32 adds (default; summation order varies
run to run on a GPU), or the (bag, slot) pairs stably sorted by code and one program per table row
summing its segment in a fixed order (bit-reproducible, at the cost of a sort of B * L keys).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._triton import INTERPRETED, autotune_configs

# Student sizes: B up to 65536, D (hidden) 128, M ~150-300, L (the visit's codes) ~10-100.
# Largest fp32 config: 3 stages x (128x64 + 64x128) x 4 B = 192 KiB of shared memory, under the H100's 227.
MATMUL_CONFIGS = [
    triton.Config({"BLOCK_B": bb, "BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bb, bm, bk, w, s in [
        (32, 32, 64, 2, 2), (32, 64, 64, 4, 2), (64, 64, 64, 4, 3), (64, 128, 32, 4, 3),
        (128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 256, 32, 8, 3), (128, 128, 64, 8, 3),
    ]
]
# 16 is tl.dot's smallest tile; with test shapes of 20-70 it exercises several tiles and ragged edges.
MATMUL_PINNED = triton.Config({"BLOCK_B": 16, "BLOCK_M": 16, "BLOCK_K": 16}, num_warps=2)
# B bucketed to a power of two so a ragged last batch reuses its bucket's choice; L (varies per batch) left out.
MATMUL_KEY = ["B_BUCKET", "M", "D", "HAS_WIDE", "LOSS"]
SCATTER_CONFIGS = [triton.Config({"BLOCK_B": bb, "BLOCK_M": bm}, num_warps=w)
                   for bb, bm, w in [(16, 64, 2), (32, 64, 4), (16, 128, 4), (32, 128, 4)]]
SCATTER_PINNED = triton.Config({"BLOCK_B": 16, "BLOCK_M": 16}, num_warps=2)


@triton.jit
def _wide_max_tile(
    # pointers
    table_ptr, codes_ptr,
    # tile coordinates
    rows, cols,
    # sizes
    B, M, L,
    # strides
    stride_table_v, stride_codes_b,
    # meta
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Masked max over each row's L codes of table[code, cols] -> (max fp32, tied slots fp32, codes int32)."""
    best = tl.full((BLOCK_B, BLOCK_M), float("-inf"), tl.float32)
    ties = tl.zeros((BLOCK_B, BLOCK_M), tl.float32)
    n = tl.zeros((BLOCK_B,), tl.int32)
    for l in range(0, L):
        code = tl.load(codes_ptr + rows * stride_codes_b + l, mask=rows < B, other=-1)  # [BLOCK_B]
        valid = (code >= 0)[:, None] & (cols[None, :] < M)
        v = tl.load(table_ptr + code[:, None] * stride_table_v + cols[None, :], mask=valid, other=float("-inf")).to(tl.float32)
        ties = tl.where(valid & (v > best), 1.0, tl.where(valid & (v == best), ties + 1.0, ties))
        best = tl.maximum(best, v)
        n += (code >= 0).to(tl.int32)
    return best, ties, n


@triton.autotune(configs=autotune_configs(MATMUL_CONFIGS, MATMUL_PINNED), key=MATMUL_KEY, reset_to_zero=["partial_ptr"])
@triton.jit
def _wide_max_head_forward_kernel(
    # pointers
    h_ptr, weight_ptr, bias_ptr, table_ptr, codes_ptr, extra_ptr, target_ptr, out_ptr, best_ptr, ties_ptr, partial_ptr,
    # sizes
    B, M, D, L, B_BUCKET,
    # strides ([B, M] tensors extra/target/out/best/ties are contiguous with row stride M)
    stride_h_b, stride_weight_m, stride_table_v, stride_codes_b,
    # meta
    HAS_BIAS: tl.constexpr, HAS_WIDE: tl.constexpr, HAS_EXTRA: tl.constexpr, SIGMOID: tl.constexpr,
    LOSS: tl.constexpr, SAVE_WIDE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h [B, D], weight [M, D], bias [M], table [V, M], codes [B, L], extra [B, M] -> out [B, M]
    (logits, or probabilities when SIGMOID or LOSS); LOSS also adds BCE against target to partial."""
    pid_b, pid_m = tl.program_id(0), tl.program_id(1)
    rows = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rows[:, None] < B) & (cols[None, :] < M)
    z = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        ht = tl.load(h_ptr + rows[:, None] * stride_h_b + k[None, :], mask=(rows[:, None] < B) & (k[None, :] < D), other=0.0)
        wt = tl.load(weight_ptr + cols[None, :] * stride_weight_m + k[:, None], mask=(cols[None, :] < M) & (k[:, None] < D), other=0.0)
        if UPCAST:  # the triton 3.9 interpreter's dot multiplies bf16's raw uint16 storage
            ht, wt = ht.to(tl.float32), wt.to(tl.float32)
        # "ieee": fp32 inputs match torch's fp32 matmul (no TF32); the op is memory-bound at D = 128.
        z = tl.dot(ht, wt, z, input_precision="ieee")
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=cols < M, other=0.0).to(tl.float32)[None, :]
    offs = rows[:, None] * M + cols[None, :]
    if HAS_WIDE:
        best, ties, n = _wide_max_tile(table_ptr, codes_ptr, rows, cols, B, M, L, stride_table_v, stride_codes_b,
                                       BLOCK_B, BLOCK_M)
        z += tl.where((n[:, None] > 0) & mask, best, 0.0)  # a visit without codes adds 0; -inf stays out of the edges
        if SAVE_WIDE:
            tl.store(best_ptr + offs, best, mask=mask)
            tl.store(ties_ptr + offs, tl.where(n[:, None] > 0, ties, 0.0), mask=mask)
    if HAS_EXTRA:
        z += tl.load(extra_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if LOSS:
        y = tl.load(target_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # Stable form of -y*log(s(z)) - (1-y)*log(1-s(z)); log(1 + e^-|z|) stays finite for any z.
        loss = tl.where(mask, tl.maximum(z, 0.0) - z * y + tl.log(1.0 + tl.exp(-tl.abs(z))), 0.0)
        tl.store(partial_ptr + pid_b * tl.num_programs(1) + pid_m, tl.sum(tl.sum(loss, axis=1), axis=0))
    if SIGMOID or LOSS:
        z = tl.sigmoid(z)
    tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=autotune_configs(SCATTER_CONFIGS, SCATTER_PINNED), key=["M"], reset_to_zero=["grad_table_ptr"])
@triton.jit
def _wide_max_head_backward_kernel(
    # pointers
    dlogits_ptr, scale_ptr, table_ptr, codes_ptr, best_ptr, ties_ptr, grad_table_ptr,
    # sizes
    B, M, L,
    # strides (dlogits/best/ties contiguous [B, M]; grad_table contiguous [V, M])
    stride_table_v, stride_codes_b,
    # meta
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """grad_table [V, M] fp32 (zeroed) += scale * dlogits[b, m] / ties[b, m] at every slot of b whose
    table[code, m] equals the saved max best[b, m]."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rows[:, None] < B) & (cols[None, :] < M)
    offs = rows[:, None] * M + cols[None, :]
    best = tl.load(best_ptr + offs, mask=mask, other=0.0)
    ties = tl.load(ties_ptr + offs, mask=mask, other=0.0)
    g = tl.load(dlogits_ptr + offs, mask=mask, other=0.0) * tl.load(scale_ptr)
    share = tl.where(ties > 0, g / tl.maximum(ties, 1.0), 0.0)
    for l in range(0, L):
        code = tl.load(codes_ptr + rows * stride_codes_b + l, mask=rows < B, other=-1)
        valid = mask & (code >= 0)[:, None] & (ties > 0)
        v = tl.load(table_ptr + code[:, None] * stride_table_v + cols[None, :], mask=valid, other=0.0).to(tl.float32)
        tl.atomic_add(grad_table_ptr + code[:, None] * M + cols[None, :], share, mask=valid & (v == best))


@triton.autotune(configs=autotune_configs(SCATTER_CONFIGS, SCATTER_PINNED), key=["M"])
@triton.jit
def _wide_max_head_backward_sorted_kernel(
    # pointers
    dlogits_ptr, scale_ptr, table_ptr, best_ptr, ties_ptr, bag_of_ptr, segment_ptr, grad_table_ptr,
    # sizes
    M,
    # strides (dlogits/best/ties contiguous [B, M]; grad_table contiguous [V, M])
    stride_table_v,
    # meta
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Row v of grad_table [V, M] = sum over its sorted segment of bags b of scale * dlogits[b] / ties[b]
    where table[v] equals best[b] (the segment lists a bag once per slot holding code v)."""
    v = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_mask = cols < M
    row = tl.load(table_ptr + v * stride_table_v + cols, mask=col_mask, other=0.0).to(tl.float32)
    start, end = tl.load(segment_ptr + v), tl.load(segment_ptr + v + 1)
    acc = tl.zeros((BLOCK_M,), tl.float32)
    for i in range(start, end, BLOCK_B):
        idx = i + tl.arange(0, BLOCK_B)
        m = (idx < end)[:, None] & col_mask[None, :]
        offs = tl.load(bag_of_ptr + idx, mask=idx < end, other=0)[:, None] * M + cols[None, :]
        ties = tl.load(ties_ptr + offs, mask=m, other=0.0)
        hit = m & (ties > 0) & (row[None, :] == tl.load(best_ptr + offs, mask=m, other=0.0))
        g = tl.load(dlogits_ptr + offs, mask=hit, other=0.0)
        acc += tl.sum(tl.where(hit, g / tl.maximum(ties, 1.0), 0.0), axis=0)
    acc = acc * tl.load(scale_ptr)
    tl.store(grad_table_ptr + v * M + cols, acc.to(grad_table_ptr.dtype.element_ty), mask=col_mask)


def _grid(meta: dict) -> tuple[int, int]:
    """Launch grid over [B, M] tiles; `meta` holds the sizes and the chosen config."""
    return (triton.cdiv(meta["B"], meta["BLOCK_B"]), triton.cdiv(meta["M"], meta["BLOCK_M"]))


def wide_max_head_forward(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor | None,
    codes: torch.Tensor | None, extra: torch.Tensor | None, target: torch.Tensor | None, *,
    sigmoid: bool, save_wide: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """-> (out [B, M], loss fp32 scalar (NaN unless target), best fp32 [B, M] | None, ties fp32 [B, M] | None).

    out: logits in h.dtype; probabilities in h.dtype with `sigmoid`; fp32 probabilities with `target`."""
    h, weight = h.contiguous(), weight.contiguous()
    (b, d), m = h.shape, weight.shape[0]
    has_wide, loss_mode = table is not None, target is not None
    out = torch.empty((b, m), dtype=torch.float32 if loss_mode else h.dtype, device=h.device)
    save_wide = save_wide and has_wide
    best = torch.empty((b, m), dtype=torch.float32, device=h.device) if save_wide else None
    ties = torch.empty((b, m), dtype=torch.float32, device=h.device) if save_wide else None
    if b * m == 0:  # the mean of nothing, as torch's BCE gives it
        return out, torch.full((), float("nan"), device=h.device), best, ties
    # Sized for the smallest tiles of any config; a larger config leaves the tail unwritten, so zero it.
    partial = torch.zeros((triton.cdiv(b, 16) * triton.cdiv(m, 16),) if loss_mode else (1,), dtype=torch.float32, device=h.device)
    if has_wide:
        table, codes = table.contiguous(), codes.contiguous()
    if extra is not None:
        extra = extra.contiguous()
    _wide_max_head_forward_kernel[_grid](
        h, weight, h if bias is None else bias.contiguous(), table if has_wide else h, codes if has_wide else h,
        h if extra is None else extra, target.contiguous() if loss_mode else h, out,
        out if best is None else best, out if ties is None else ties, partial,
        b, m, d, codes.shape[1] if has_wide else 0, triton.next_power_of_2(b),
        h.stride(0), weight.stride(0), table.stride(0) if has_wide else 0, codes.stride(0) if has_wide else 0,
        HAS_BIAS=bias is not None, HAS_WIDE=has_wide, HAS_EXTRA=extra is not None, SIGMOID=sigmoid,
        LOSS=loss_mode, SAVE_WIDE=save_wide, UPCAST=INTERPRETED,
    )
    return out, partial.sum() / (b * m), best, ties


def wide_max_head_backward(ctx, dlogits: torch.Tensor, scale: torch.Tensor) -> tuple:
    """dlogits fp32 [B, M] (times the scalar `scale`) -> (dh, dweight, dbias, dtable, None, dextra) for
    the inputs that need a gradient; scaling the small results, not the [B, M] dlogits, where possible."""
    h, weight, table, codes, best, ties = ctx.saved_tensors[:6]
    needs = ctx.needs_input_grad
    low = dlogits.to(h.dtype)
    dh = (low @ weight * scale).to(h.dtype) if needs[0] else None  # [B, M] @ [M, D]
    dweight = (low.t() @ h * scale).to(weight.dtype) if needs[1] else None  # [M, B] @ [B, D]
    dbias = (dlogits.sum(0) * scale).to(ctx.bias_dtype) if needs[2] else None
    dextra = (dlogits * scale).to(ctx.extra_dtype) if needs[5] else None
    dtable = None
    if needs[3]:
        dtable = _table_grad(dlogits.contiguous(), scale.reshape(1).float(), table, codes, best, ties)
    return dh, dweight, dbias, dtable, None, dextra


def _table_grad(dlogits, scale, table, codes, best, ties) -> torch.Tensor:
    """The wide table's gradient [V, M] in table.dtype (atomic or sorted, see the module docstring)."""
    (b, m), (num_rows, length) = dlogits.shape, (table.shape[0], codes.shape[1])
    if b * m == 0 or length == 0 or num_rows == 0:
        return torch.zeros(table.shape, dtype=table.dtype, device=table.device)
    if not torch.are_deterministic_algorithms_enabled():
        grad = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
        _wide_max_head_backward_kernel[_grid](dlogits, scale, table, codes, best, ties, grad, b, m, length,
                                              table.stride(0), codes.stride(0))
        return grad.to(table.dtype)
    # Padding gets key V: it sorts last, outside every row's segment.
    keys = torch.where(codes >= 0, codes, num_rows).reshape(-1)  # [B * L]
    sorted_keys, order = torch.sort(keys, stable=True)
    segment = torch.searchsorted(sorted_keys, torch.arange(num_rows + 1, device=keys.device))  # [V + 1]
    grad = torch.empty(table.shape, dtype=table.dtype, device=table.device)
    grid = lambda meta: (num_rows, triton.cdiv(m, meta["BLOCK_M"]))  # noqa: E731
    _wide_max_head_backward_sorted_kernel[grid](dlogits, scale, table, best, ties, order // length, segment, grad, m,
                                                table.stride(0))
    return grad


def _save(ctx, h, weight, bias, table, codes, extra, best, ties, *more) -> None:
    ctx.save_for_backward(h, weight, table, codes, best, ties, *more)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.extra_dtype = None if extra is None else extra.dtype


class WideMaxHeadFunction(torch.autograd.Function):
    """Logits or probabilities; gradients to h, weight, bias, the wide table and extra (codes are indices)."""

    @staticmethod
    def forward(ctx, h, weight, bias, table, codes, extra, sigmoid: bool):
        needs_grad = any(ctx.needs_input_grad)
        out, _, best, ties = wide_max_head_forward(h, weight, bias, table, codes, extra, None, sigmoid=sigmoid,
                                                   save_wide=ctx.needs_input_grad[3])
        _save(ctx, h, weight, bias, table, codes, extra, best, ties, out if sigmoid and needs_grad else None)
        ctx.sigmoid = sigmoid
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        dlogits = grad_out.float()
        if ctx.sigmoid:
            p = ctx.saved_tensors[6].float()
            dlogits = dlogits * p * (1 - p)
        return (*wide_max_head_backward(ctx, dlogits, torch.ones((), device=dlogits.device)), None)


class WideMaxHeadLossFunction(torch.autograd.Function):
    """(mean BCE-with-logits, probabilities fp32 [B, M] without gradient); gradients as WideMaxHeadFunction."""

    @staticmethod
    def forward(ctx, h, weight, bias, table, codes, extra, target):
        out, loss, best, ties = wide_max_head_forward(h, weight, bias, table, codes, extra, target, sigmoid=False,
                                                      save_wide=ctx.needs_input_grad[3])
        ctx.mark_non_differentiable(out)
        _save(ctx, h, weight, bias, table, codes, extra, best, ties, out, target)
        return loss, out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor, _grad_prob: torch.Tensor):
        prob, target = ctx.saved_tensors[6:]
        dlogits = prob - target.float()  # d(BCE)/d(logit) = sigmoid(z) - y, before the mean's 1 / (B * M)
        scale = grad_loss.float() / max(dlogits.numel(), 1)
        return (*wide_max_head_backward(ctx, dlogits, scale), None)
