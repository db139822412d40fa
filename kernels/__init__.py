"""Fused kernels for the student's hot path, each with a pure-torch reference.

- `embedding_bag`: masked gather + sum/mean of -1-padded code lists (visit code sets, profile fields).
- `wide_max_head`: the student's scoring head - h @ W.T + b + the masked max of per-code logit rows
  + per-row extra logits - as logits or probabilities; `wide_max_head_loss`, its training form
  (BCE-with-logits and probabilities), backward without the [B, L, M] gather.

`backend` picks the implementation: "auto" runs Triton on CUDA tensors and the reference
(`leader_edge.kernels.reference`) on anything else; "triton" forces the kernel (CPU tensors only
under the Triton interpreter, TRITON_INTERPRET=1); "torch" forces the reference. Importing this
package never imports triton: the `triton_<op>` modules load on the first Triton call.
LEADER_EDGE_AUTOTUNE=0 (read at that first call) pins every kernel to one small-tile config; the
tests set it, and the interpreter always behaves so.

Examples:
    >>> import torch
    >>> from leader_edge import kernels
    >>> w = torch.randn(10, 4)
    >>> kernels.embedding_bag(w, torch.tensor([[1, 2, -1], [-1, -1, -1]]), mode="mean").shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType

import torch

from . import reference
from .reference import EMBEDDING_BAG_MODES

__all__ = ["BACKENDS", "EMBEDDING_BAG_MODES", "EmbeddingBag", "WideMaxHead", "embedding_bag", "reference", "wide_max_head",
           "wide_max_head_loss"]

BACKENDS = ("auto", "triton", "torch")
_log = logging.getLogger(__name__)
_warned_fallback = False


@functools.cache
def _load(op: str) -> ModuleType:
    return importlib.import_module(f".triton_{op}", __name__)  # cached: this runs on every call


def _triton_op(op: str, backend: str, device: torch.device) -> ModuleType | None:
    """The `triton_<op>` module that should run, or None when the reference should."""
    global _warned_fallback
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}; use 'auto' unless forcing an implementation")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return None
    if device.type not in ("cuda", "cpu"):
        raise RuntimeError(f"backend='triton' runs on CUDA (or CPU under TRITON_INTERPRET=1), got {device}; "
                           "use backend='torch' or 'auto'")
    try:
        module = _load(op)
    except Exception as exc:  # ImportError, or triton failing to find a driver/compiler
        if backend == "triton":
            raise RuntimeError(f"backend='triton' needs a working triton: {exc!r}; install triton==3.9.0 "
                               "or use backend='torch'") from exc
        if not _warned_fallback:
            _log.warning("triton unusable (%r): kernels fall back to the torch reference", exc)
            _warned_fallback = True
        return None
    if device.type == "cpu" and not module.INTERPRETED:
        raise RuntimeError("backend='triton' got CPU tensors but the kernels were compiled for a GPU: set "
                           "TRITON_INTERPRET=1 before the first Triton call of the process (it is read when the "
                           "kernels load), or use backend='torch' / CUDA tensors")
    return module


def _check_same_device(*tensors: torch.Tensor | None) -> torch.device:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}; move them with .to(device)")
    return devices.pop()


def _check_codes(op: str, codes: torch.Tensor, num_rows: int) -> None:
    """Refuse a code >= num_rows, the same ValueError on every device.

    Checked on the host before any launch: an unchecked code would read out of bounds in the kernel
    (it skips such codes) but raise in the CPU reference, so CPU and CUDA would disagree. On CUDA the
    check is one max-reduction and one host sync per call (a few microseconds of launch-queue stall);
    Triton's device_assert would need TRITON_DEBUG=1 and kills the CUDA context instead of raising.
    """
    if codes.numel() and int(codes.max()) >= num_rows:
        raise ValueError(f"{op}: code {int(codes.max())} is out of range for a table with V = {num_rows} "
                         "rows; encode codes against the same vocabulary as the table")


def embedding_bag(weight: torch.Tensor, codes: torch.Tensor, mode: str = "sum", backend: str = "auto") -> torch.Tensor:
    """Sum or mean of the rows of `weight` named by each bag of `codes`, in one pass.

    Args:
        weight: float [V, D] table (a parameter or any differentiable tensor: it gets the gradient).
        codes: int64 [B, L] row indices padded with -1 (any negative value is padding). A bag with
            no code gives a zero row in both modes. Repeated codes count as often as they appear.
        mode: "sum" or "mean" (mean divides by the number of non-padding codes).
        backend: "auto", "triton" or "torch" (see the module docstring).

    Returns:
        [B, D] in `weight.dtype`, accumulated in fp32. The Triton backward accumulates atomically
        (fast, fp32 sums in varying order) unless `torch.use_deterministic_algorithms(True)` is on,
        which switches to a sorted, bit-reproducible segment reduction.

    Raises:
        ValueError: bad shapes, dtypes, mode or backend, or a code >= V (on every device).
    """
    if mode not in EMBEDDING_BAG_MODES:
        raise ValueError(f"mode={mode!r} is not one of {EMBEDDING_BAG_MODES}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a float [V, D] tensor, got {weight.dtype} {tuple(weight.shape)}")
    if codes.dim() != 2 or codes.dtype != torch.int64:
        raise ValueError(f"codes must be int64 [B, L] padded with -1, got {codes.dtype} {tuple(codes.shape)}; "
                         "convert with codes.long()")
    device = _check_same_device(weight, codes)
    _check_codes("embedding_bag", codes, weight.shape[0])
    op = _triton_op("embedding_bag", backend, device)
    if op is None:
        return reference.embedding_bag(weight, codes, mode)
    return op.EmbeddingBagFunction.apply(weight, codes, mode == "mean")


def _check_head(h, weight, bias, table, codes, extra, target=None) -> torch.device:
    """Shapes, dtypes, devices and codes of a wide_max_head call (see `wide_max_head`)."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"expected h [B, D] and weight [M, D], got {tuple(h.shape)} and {tuple(weight.shape)}")
    if not (h.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"h and weight must be float tensors, got {h.dtype} and {weight.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [M] = [{weight.shape[0]}] or None, got {tuple(bias.shape)}")
    b, m = h.shape[0], weight.shape[0]
    if table is not None:
        if table.dim() != 2 or table.shape[1] != m or not table.is_floating_point():
            raise ValueError(f"table must be float [V, M] with M = {m}, got {table.dtype} {tuple(table.shape)}")
        if codes is None or codes.dim() != 2 or codes.shape[0] != b or codes.dtype != torch.int64:
            raise ValueError(f"codes must be int64 [B, L] with B = {b}, padded with -1, got "
                             f"{None if codes is None else (codes.dtype, tuple(codes.shape))}; convert with codes.long()")
        _check_codes("wide_max_head", codes, table.shape[0])
    for name, t in (("extra", extra), ("target", target)):
        if t is not None and (tuple(t.shape) != (b, m) or not t.is_floating_point()):
            raise ValueError(f"{name} must be float [B, M] = [{b}, {m}], got {t.dtype} {tuple(t.shape)}")
    return _check_same_device(h, weight, bias, table, codes if table is not None else None, extra, target)


def wide_max_head(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor | None,
    codes: torch.Tensor | None, extra: torch.Tensor | None = None, sigmoid: bool = False, backend: str = "auto",
) -> torch.Tensor:
    """The student's scoring head in one pass: h @ weight.T + bias + (max over each bag's codes of
    their `table` rows) + extra, logits or (`sigmoid`) probabilities, all in fp32 registers.

    Args:
        h: float [B, D] hidden states. weight: [M, D] (cast to h.dtype by the Triton path). bias: [M] or None.
        table: float [V, M] per-code logit rows (the wide path; it gets the gradient of the max's
            slots, split evenly among ties as torch's amax does), or None for the linear head alone.
        codes: int64 [B, L] rows of `table`, -1 padded; a bag without a code adds 0.
        extra: float [B, M] per-row logits (the counting prior), or None; differentiable.
        sigmoid: return probabilities (inference) instead of logits.
        backend: "auto", "triton" or "torch".

    Returns:
        [B, M] in `h.dtype`; differentiable in h, weight, bias, table and extra.

    Raises:
        ValueError: bad shapes or dtypes, or a code >= V (on every device).
    """
    op = _triton_op("wide_max_head", backend, _check_head(h, weight, bias, table, codes, extra))
    if op is None:
        return reference.wide_max_head(h, weight, bias, table, codes, extra, sigmoid)
    return op.WideMaxHeadFunction.apply(h, weight.to(h.dtype), bias, table, codes, extra, sigmoid)


def wide_max_head_loss(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor | None,
    codes: torch.Tensor | None, extra: torch.Tensor | None, target: torch.Tensor, backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training form of `wide_max_head`: mean BCE-with-logits against `target`, without the logits.

    The Triton path keeps, per [B, M] element, the fp32 probability (returned: the batch's y_prob)
    and, when the table needs a gradient, the max and its tie count; backward derives
    dlogits = p - y from them. Nothing [B, L, M] is built in either direction.

    Args:
        as `wide_max_head`; target: float [B, M] in [0, 1] (no gradient flows to it).

    Returns:
        (fp32 scalar loss, mean over all B * M elements (NaN when B * M == 0, as in torch);
        fp32 [B, M] probabilities, not differentiable).
    """
    device = _check_head(h, weight, bias, table, codes, extra, target)
    op = _triton_op("wide_max_head", backend, device)
    if op is None:
        return reference.wide_max_head_loss(h, weight, bias, table, codes, extra, target)
    return op.WideMaxHeadLossFunction.apply(h, weight.to(h.dtype), bias, table, codes, extra, target.detach())


from .modules import EmbeddingBag, WideMaxHead  # noqa: E402 - the modules call the functions above
