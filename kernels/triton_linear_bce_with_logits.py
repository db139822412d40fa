"""Triton linear + BCE-with-logits: the student's training loss with its gradient fused into the forward.

Specification: `leader_edge.kernels.reference.linear_bce_with_logits`. Loaded lazily by
`leader_edge.kernels`. One pass computes each [BLOCK_B, BLOCK_M] logits tile in registers, adds its
loss to a per-tile partial sum and, when a gradient is needed, writes dlogits = sigmoid(z) - y. The
logits and probabilities are never written; eager writes logits, reads them for the loss and again
for the gradient. Backward runs two cuBLAS matmuls (dx, dweight) and one reduction (dbias) on
dlogits and scales their results by grad_output / (B * M). Partial sums are added by torch in a fixed order, so the
loss is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._triton import INTERPRETED, autotune_configs
from .triton_linear_sigmoid import MATMUL_CONFIGS, MATMUL_KEY, MATMUL_PINNED, linear_backward, logits_tile, matmul_grid


# reset_to_zero: configs with smaller tiles write more partial sums while autotuning; the chosen
# config must not add their leftovers.
@triton.autotune(configs=autotune_configs(MATMUL_CONFIGS, MATMUL_PINNED), key=MATMUL_KEY, reset_to_zero=["partial_ptr"])
@triton.jit
def _linear_bce_with_logits_kernel(
    # pointers
    x_ptr, weight_ptr, bias_ptr, target_ptr, partial_ptr, dlogits_ptr,
    # sizes
    B, M, D, B_BUCKET,
    # strides
    stride_x_b, stride_weight_m, stride_target_b, stride_dlogits_b,
    # meta
    HAS_BIAS: tl.constexpr, WRITE_GRAD: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """x [B, D], weight [M, D], bias [M], target [B, M] -> partial [tiles] loss sums, dlogits [B, M]."""
    pid_b, pid_m = tl.program_id(0), tl.program_id(1)
    rows = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rows[:, None] < B) & (cols[None, :] < M)
    z = logits_tile(x_ptr, weight_ptr, bias_ptr, rows, cols, B, M, D, stride_x_b, stride_weight_m,
                    HAS_BIAS, UPCAST, BLOCK_B, BLOCK_M, BLOCK_K)
    y = tl.load(target_ptr + rows[:, None] * stride_target_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # Stable form of -y*log(s(z)) - (1-y)*log(1-s(z)); log(1 + e^-|z|) stays finite for any z.
    loss = tl.maximum(z, 0.0) - z * y + tl.log(1.0 + tl.exp(-tl.abs(z)))
    loss = tl.where(mask, loss, 0.0)
    tl.store(partial_ptr + pid_b * tl.num_programs(1) + pid_m, tl.sum(tl.sum(loss, axis=1), axis=0))
    if WRITE_GRAD:
        tl.store(dlogits_ptr + rows[:, None] * stride_dlogits_b + cols[None, :],
                 (tl.sigmoid(z) - y).to(dlogits_ptr.dtype.element_ty), mask=mask)


def linear_bce_with_logits_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, write_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (fp32 scalar mean loss, fp32 dlogits [B, M] = sigmoid(z) - y, unscaled, or None)."""
    x, weight, target = x.contiguous(), weight.contiguous(), target.contiguous()
    (b, d), m = x.shape, weight.shape[0]
    if b * m == 0:  # the mean of nothing, as torch's BCE gives it
        return torch.full((), float("nan"), device=x.device), (torch.zeros((b, m), device=x.device) if write_grad else None)
    has_bias = bias is not None
    # dlogits in fp32 whatever x's dtype: sigmoid(z) - y is in [-1, 1] and bf16 would cost 3 digits.
    dlogits = torch.empty((b, m), dtype=torch.float32, device=x.device) if write_grad else None
    # Sized for the smallest tiles of any config; a larger config leaves the tail unwritten, so zero it.
    max_tiles = triton.cdiv(b, 16) * triton.cdiv(m, 16)
    partial = torch.zeros((max_tiles,), dtype=torch.float32, device=x.device)
    _linear_bce_with_logits_kernel[matmul_grid](
        x, weight, bias.contiguous() if has_bias else x, target, partial, dlogits if write_grad else x,
        b, m, d, triton.next_power_of_2(b),
        x.stride(0), weight.stride(0), target.stride(0), m,
        HAS_BIAS=has_bias, WRITE_GRAD=write_grad, UPCAST=INTERPRETED,
    )
    return partial.sum() / (b * m), dlogits


class LinearBCEWithLogitsFunction(torch.autograd.Function):
    """Autograd wrapper: gradients to x, weight and bias; target gets none (it is a label)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
        write_grad = any(ctx.needs_input_grad[:3])
        loss, dlogits = linear_bce_with_logits_forward(x, weight, bias, target, write_grad)
        if write_grad:
            ctx.save_for_backward(x, weight, dlogits)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        x, weight, dlogits = ctx.saved_tensors
        # d(mean)/d(logit) = (sigmoid(z) - y) / (B * M): the scalar scales the three small results,
        # not the [B, M] dlogits (which stay intact if backward runs again with retain_graph).
        scale = grad_loss.float() / dlogits.numel()
        return (*linear_backward(dlogits, x, weight, ctx.needs_input_grad, ctx.bias_dtype, scale), None)
