"""Triton embedding bag: masked gather + sum/mean of padded code lists, forward and backward.

Specification: `leader_edge.kernels.reference.embedding_bag`. Loaded lazily by `leader_edge.kernels`.

Backward accumulation (two kernels, picked by `torch.are_deterministic_algorithms_enabled()`):
- atomic (default): one program per bag adds its scaled gradient into an fp32 [V, D] buffer with
  `tl.atomic_add`; fastest, but fp32 addition order varies run to run (last-bit differences).
- deterministic: the flattened codes are stably sorted by code (torch.sort, no host sync), then one
  program per vocabulary row sums its segment in a fixed order and writes the row once (zeros for
  unused rows). Bit-identical across runs at the cost of a sort of B * L int64 keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._triton import INTERPRETED, autotune_configs  # noqa: F401 - INTERPRETED is read by the dispatcher

# The student's bags hold ~5-40 codes and D = 64, so one program per (bag, D-block) and a loop
# over L in BLOCK_L chunks; D-blocks above 128 split over the grid's second axis.
MAX_BLOCK_D = 128

_CONFIGS = [triton.Config({"BLOCK_L": bl}, num_warps=w) for bl in (8, 16, 32) for w in (1, 2, 4)]
_PINNED = triton.Config({"BLOCK_L": 4}, num_warps=2)  # 4 < most test L: the L loop runs several times
# Keyed on D only: the padded L changes from batch to batch and each new key costs ~1 s of tuning.
_KEY = ["D"]


@triton.autotune(configs=autotune_configs(_CONFIGS, _PINNED), key=_KEY)
@triton.jit
def _embedding_bag_forward_kernel(
    # pointers
    weight_ptr, codes_ptr, out_ptr, scale_ptr,
    # sizes
    V, L, D,
    # strides (codes are contiguous [B, L]; rows of weight/out are contiguous)
    stride_weight_v, stride_out_b,
    # meta
    MEAN: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """weight [V, D], codes [B, L] -> out [B, D], scale [B] (1/count for mean, 1 for sum)."""
    bag = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    count = tl.zeros([BLOCK_L], dtype=tl.int32)
    for start in range(0, L, BLOCK_L):
        l = start + tl.arange(0, BLOCK_L)
        code = tl.load(codes_ptr + bag * L + l, mask=l < L, other=-1)
        tl.device_assert(code < V, "embedding_bag: a code is >= V (rows of weight)")  # TRITON_DEBUG=1 only
        valid = (code >= 0) & (code < V)  # an unchecked code >= V on CUDA reads nothing
        rows = tl.load(weight_ptr + code[:, None] * stride_weight_v + d[None, :],
                       mask=valid[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_L, BLOCK_D]
        acc += tl.sum(rows.to(tl.float32), axis=0)
        count += valid.to(tl.int32)
    if MEAN:
        scale = 1.0 / tl.maximum(tl.sum(count, axis=0), 1).to(tl.float32)
    else:
        scale = 1.0
    tl.store(out_ptr + bag * stride_out_b + d, (acc * scale).to(out_ptr.dtype.element_ty), mask=d_mask)
    # Every D-block program stores the same value: a benign duplicate write of 4 bytes per bag.
    tl.store(scale_ptr + bag, scale)


@triton.autotune(configs=autotune_configs(_CONFIGS, _PINNED), key=_KEY, reset_to_zero=["grad_weight_ptr"])
@triton.jit
def _embedding_bag_backward_atomic_kernel(
    # pointers
    grad_out_ptr, codes_ptr, scale_ptr, grad_weight_ptr,
    # sizes
    V, L, D,
    # strides
    stride_grad_out_b, stride_grad_weight_v,
    # meta
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad_out [B, D] -> grad_weight [V, D] fp32 (zeroed by the host) += scale[b] * grad_out[b]."""
    bag = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    g = tl.load(grad_out_ptr + bag * stride_grad_out_b + d, mask=d_mask, other=0.0).to(tl.float32)
    g = g * tl.load(scale_ptr + bag)
    for start in range(0, L, BLOCK_L):
        l = start + tl.arange(0, BLOCK_L)
        code = tl.load(codes_ptr + bag * L + l, mask=l < L, other=-1)
        valid = (code >= 0) & (code < V)
        tl.atomic_add(grad_weight_ptr + code[:, None] * stride_grad_weight_v + d[None, :],
                      tl.broadcast_to(g[None, :], (BLOCK_L, BLOCK_D)), mask=valid[:, None] & d_mask[None, :])


@triton.autotune(configs=autotune_configs(_CONFIGS, _PINNED), key=_KEY)
@triton.jit
def _embedding_bag_backward_sorted_kernel(
    # pointers
    grad_out_ptr, scale_ptr, bag_of_ptr, segment_ptr, grad_weight_ptr,
    # sizes
    D,
    # strides
    stride_grad_out_b, stride_grad_weight_v,
    # meta
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row v of grad_weight [V, D] = sum of scale[b] * grad_out[b] over its sorted segment of bags."""
    v = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    start = tl.load(segment_ptr + v)
    end = tl.load(segment_ptr + v + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(start, end, BLOCK_L):
        idx = i + tl.arange(0, BLOCK_L)
        m = idx < end
        bag = tl.load(bag_of_ptr + idx, mask=m, other=0)
        s = tl.load(scale_ptr + bag, mask=m, other=0.0)
        g = tl.load(grad_out_ptr + bag[:, None] * stride_grad_out_b + d[None, :],
                    mask=m[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_L, BLOCK_D]
        acc += tl.sum(g * s[:, None], axis=0)
    tl.store(grad_weight_ptr + v * stride_grad_weight_v + d, acc.to(grad_weight_ptr.dtype.element_ty), mask=d_mask)


def _block_d(d: int) -> int:
    return min(triton.next_power_of_2(max(d, 1)), MAX_BLOCK_D)


def embedding_bag_forward(weight: torch.Tensor, codes: torch.Tensor, mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [V, D], codes int64 [B, L] -> (out [B, D] in weight.dtype, scale fp32 [B])."""
    weight, codes = weight.contiguous(), codes.contiguous()
    (b, length), d = codes.shape, weight.shape[1]
    out = torch.empty((b, d), dtype=weight.dtype, device=weight.device)
    scale = torch.empty((b,), dtype=torch.float32, device=weight.device)
    if b == 0 or d == 0:
        return out.zero_(), scale.fill_(1.0)
    block_d = _block_d(d)
    grid = (b, triton.cdiv(d, block_d))
    _embedding_bag_forward_kernel[grid](
        weight, codes, out, scale, weight.shape[0], length, d, weight.stride(0), out.stride(0), MEAN=mean, BLOCK_D=block_d
    )
    return out, scale


def embedding_bag_backward(
    grad_out: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, num_rows: int, dtype: torch.dtype
) -> torch.Tensor:
    """grad_out [B, D], codes [B, L], scale [B] -> grad_weight [num_rows, D] in `dtype`."""
    grad_out, codes = grad_out.contiguous(), codes.contiguous()
    (b, length), d = codes.shape, grad_out.shape[1]
    if b == 0 or d == 0 or num_rows == 0 or length == 0:
        return torch.zeros((num_rows, d), dtype=dtype, device=grad_out.device)
    block_d = _block_d(d)
    if not torch.are_deterministic_algorithms_enabled():
        grad_weight = torch.zeros((num_rows, d), dtype=torch.float32, device=grad_out.device)
        _embedding_bag_backward_atomic_kernel[(b, triton.cdiv(d, block_d))](
            grad_out, codes, scale, grad_weight, num_rows, length, d, grad_out.stride(0), grad_weight.stride(0), BLOCK_D=block_d
        )
        return grad_weight.to(dtype)
    # Padding (and any unchecked code >= V) gets key num_rows: it sorts last, outside every segment.
    keys = torch.where((codes >= 0) & (codes < num_rows), codes, num_rows).reshape(-1)  # [B * L]
    sorted_keys, order = torch.sort(keys, stable=True)
    bag_of = order // length  # [B * L] bag of each sorted entry
    segment = torch.searchsorted(sorted_keys, torch.arange(num_rows + 1, device=keys.device))  # [V + 1]
    grad_weight = torch.empty((num_rows, d), dtype=dtype, device=grad_out.device)
    _embedding_bag_backward_sorted_kernel[(num_rows, triton.cdiv(d, block_d))](
        grad_out, scale, bag_of, segment, grad_weight, d, grad_out.stride(0), grad_weight.stride(0), BLOCK_D=block_d
    )
    return grad_weight


class EmbeddingBagFunction(torch.autograd.Function):
    """Autograd wrapper: gradient to `weight` only (codes are indices)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, codes: torch.Tensor, mean: bool) -> torch.Tensor:
        out, scale = embedding_bag_forward(weight, codes, mean)
        ctx.save_for_backward(codes, scale)
        ctx.num_rows, ctx.dtype = weight.shape[0], weight.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        codes, scale = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_weight = embedding_bag_backward(grad_out, codes, scale, ctx.num_rows, ctx.dtype)
        return grad_weight, None, None
