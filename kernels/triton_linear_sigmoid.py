"""Triton linear + sigmoid: medication probabilities with the sigmoid in the fp32 epilogue.

Specification: `leader_edge.kernels.reference.linear_sigmoid`. Loaded lazily by `leader_edge.kernels`.
The [BLOCK_B, BLOCK_M] logits tile never leaves registers. Backward: one elementwise kernel turns
the upstream gradient and the saved probabilities into dlogits = g * p * (1 - p); the two small
matmuls (dx, dweight) then run on cuBLAS via torch, which beats a hand-written split-K at these sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._triton import INTERPRETED, autotune_configs

# Student sizes: B up to 65536, D (hidden) ~64-256, M ~150-300, so tiles cover D in one or a few steps.
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
# Autotune key: B is bucketed to a power of two so a ragged last batch reuses its bucket's choice.
MATMUL_KEY = ["B_BUCKET", "M", "D"]
ELEMENTWISE_BLOCK = 1024


@triton.jit
def logits_tile(
    # pointers
    x_ptr, weight_ptr, bias_ptr,
    # tile coordinates
    rows, cols,
    # sizes
    B, M, D,
    # strides (last dimensions contiguous)
    stride_x_b, stride_weight_m,
    # meta
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """x [B, D] @ weight[M, D].T (+ bias) for rows x cols -> fp32 [BLOCK_B, BLOCK_M]."""
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rows[:, None] * stride_x_b + k[None, :],
                     mask=(rows[:, None] < B) & (k[None, :] < D), other=0.0)  # [BLOCK_B, BLOCK_K]
        wt = tl.load(weight_ptr + cols[None, :] * stride_weight_m + k[:, None],
                     mask=(cols[None, :] < M) & (k[:, None] < D), other=0.0)  # [BLOCK_K, BLOCK_M]
        if UPCAST:  # the triton 3.9 interpreter's dot multiplies bf16's raw uint16 storage
            xt, wt = xt.to(tl.float32), wt.to(tl.float32)
        # "ieee": fp32 inputs match torch's fp32 matmul (no TF32); the op is memory-bound at D = 64.
        acc = tl.dot(xt, wt, acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < M, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.autotune(configs=autotune_configs(MATMUL_CONFIGS, MATMUL_PINNED), key=MATMUL_KEY)
@triton.jit
def _linear_sigmoid_forward_kernel(
    # pointers
    x_ptr, weight_ptr, bias_ptr, out_ptr,
    # sizes
    B, M, D, B_BUCKET,
    # strides
    stride_x_b, stride_weight_m, stride_out_b,
    # meta
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """x [B, D], weight [M, D], bias [M] -> out [B, M] = sigmoid(x @ weight.T + bias)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    z = logits_tile(x_ptr, weight_ptr, bias_ptr, rows, cols, B, M, D, stride_x_b, stride_weight_m,
                    HAS_BIAS, UPCAST, BLOCK_B, BLOCK_M, BLOCK_K)
    p = tl.sigmoid(z)
    tl.store(out_ptr + rows[:, None] * stride_out_b + cols[None, :], p.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < B) & (cols[None, :] < M))


@triton.jit
def _sigmoid_backward_kernel(
    # pointers
    grad_ptr, prob_ptr, dlogits_ptr,
    # sizes
    N,
    # meta
    BLOCK: tl.constexpr,
):
    """dlogits = grad * p * (1 - p), elementwise over N contiguous elements, in fp32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(prob_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dlogits_ptr + offs, (g * p * (1.0 - p)).to(dlogits_ptr.dtype.element_ty), mask=mask)


def matmul_grid(meta: dict) -> tuple[int, int]:
    """Launch grid over [B, M] tiles; `meta` holds the sizes and the chosen config."""
    return (triton.cdiv(meta["B"], meta["BLOCK_B"]), triton.cdiv(meta["M"], meta["BLOCK_M"]))


def linear_sigmoid_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [B, D], weight [M, D], bias [M] | None -> probabilities [B, M] in x.dtype."""
    x, weight = x.contiguous(), weight.contiguous()
    (b, d), m = x.shape, weight.shape[0]
    out = torch.empty((b, m), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    has_bias = bias is not None
    _linear_sigmoid_forward_kernel[matmul_grid](
        x, weight, bias.contiguous() if has_bias else x, out, b, m, d, triton.next_power_of_2(b),
        x.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=has_bias, UPCAST=INTERPRETED,
    )
    return out


def linear_backward(
    dlogits: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, needs: tuple[bool, ...],
    bias_dtype: torch.dtype | None, scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dlogits [B, M] -> (dx [B, D], dweight [M, D], dbias [M]) for the inputs that `needs` a gradient,
    each times the scalar `scale` when given (cheaper than scaling the [B, M] dlogits)."""
    dlogits = dlogits.to(x.dtype)
    grads = (
        dlogits @ weight if needs[0] else None,  # [B, M] @ [M, D]
        dlogits.t() @ x if needs[1] else None,  # [M, B] @ [B, D]
        dlogits.float().sum(0) if needs[2] else None,
    )
    if scale is not None:
        grads = tuple(None if g is None else (g * scale).to(g.dtype) for g in grads)
    dx, dweight, dbias = grads
    return dx, dweight, (dbias.to(bias_dtype) if dbias is not None else None)


class LinearSigmoidFunction(torch.autograd.Function):
    """Autograd wrapper: gradients to x, weight and bias; saves x, weight and the probabilities (no logits)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        prob = linear_sigmoid_forward(x, weight, bias)
        ctx.save_for_backward(x, weight, prob)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return prob

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, prob = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dlogits = torch.empty(prob.shape, dtype=torch.float32, device=prob.device)
        n = prob.numel()
        if n:
            _sigmoid_backward_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](grad_out, prob, dlogits, n, BLOCK=ELEMENTWISE_BLOCK)
        return linear_backward(dlogits, x, weight, ctx.needs_input_grad, ctx.bias_dtype)
