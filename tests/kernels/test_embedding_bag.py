"""embedding_bag: Triton kernel vs the torch reference, outputs and weight gradients."""

import pytest
import torch

from leader_edge import kernels
from leader_edge.kernels import reference

# (V, D, B, L): nothing a power of two except where noted; L = 1; D = 130 spans two 128-wide D-blocks.
SHAPES = [(23, 37, 11, 7), (5, 3, 4, 1), (50, 130, 6, 9), (17, 64, 9, 13)]


def make_codes(num_rows: int, b: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Random codes with ~1/3 padding; bag 0 all padding, bag 1 one code repeated, bag 2 full."""
    codes = torch.randint(0, num_rows, (b, length), generator=gen)
    codes[torch.rand(b, length, generator=gen) < 0.33] = -1
    codes[0] = -1
    if b > 2:
        codes[1] = codes[1, 0].clamp(min=0)
        codes[2] = torch.randint(0, num_rows, (length,), generator=gen)
    return codes


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "sorted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_embedding_bag_matches_reference(shape, mode, dtype, deterministic, device, close, monkeypatch):
    num_rows, d, b, length = shape
    gen = torch.Generator().manual_seed(10 * SHAPES.index(shape) + (mode == "mean"))
    weight = torch.randn(num_rows, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    codes = make_codes(num_rows, b, length, gen).to(device)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)

    out = kernels.embedding_bag(weight, codes, mode, backend="triton")
    expected = reference.embedding_bag(weight, codes, mode)
    grad = torch.randn(expected.shape, generator=gen).to(device=device, dtype=dtype)
    (grad_weight,) = torch.autograd.grad(out, weight, grad)
    (expected_grad,) = torch.autograd.grad(expected, weight, grad)

    assert out.dtype == dtype and out.shape == (b, d)
    close(out, expected, dtype)
    close(grad_weight, expected_grad, dtype)
    assert torch.all(out[0] == 0), "an all-padding bag must give zeros"


def test_embedding_bag_sorted_backward_is_bit_reproducible(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(31, 19, generator=gen, requires_grad=True)
    codes = make_codes(31, 12, 10, gen)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    grads = [torch.autograd.grad(kernels.embedding_bag(weight, codes, "mean", backend="triton").sum(), weight)[0]
             for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


def test_embedding_bag_non_contiguous_inputs(close):
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(9, 20, generator=gen).t().requires_grad_()  # [20, 9], column-major
    codes = make_codes(20, 8, 12, gen)[:, ::2]  # every other slot: stride 2
    out = kernels.embedding_bag(weight, codes, "sum", backend="triton")
    close(out, reference.embedding_bag(weight, codes, "sum"), torch.float32)
    grad = torch.autograd.grad(out.sum(), weight)[0]
    close(grad, torch.autograd.grad(reference.embedding_bag(weight, codes, "sum").sum(), weight)[0], torch.float32)


@pytest.mark.parametrize("b, length", [(0, 5), (4, 0)])
def test_embedding_bag_empty_inputs_give_zeros(b, length):
    weight = torch.randn(7, 5, requires_grad=True)
    codes = torch.full((b, length), -1, dtype=torch.int64)
    out = kernels.embedding_bag(weight, codes, "mean", backend="triton")
    assert out.shape == (b, 5) and torch.all(out == 0)
    out.sum().backward()
    assert torch.all(weight.grad == 0)


def test_embedding_bag_rejects_bad_inputs():
    weight = torch.randn(7, 5)
    with pytest.raises(ValueError, match="out of range"):
        kernels.embedding_bag(weight, torch.tensor([[7, -1]]))
    with pytest.raises(ValueError, match="int64"):
        kernels.embedding_bag(weight, torch.tensor([[1, -1]], dtype=torch.int32))
    with pytest.raises(ValueError, match="mode"):
        kernels.embedding_bag(weight, torch.tensor([[1, -1]]), mode="max")
