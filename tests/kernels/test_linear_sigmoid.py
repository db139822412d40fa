"""linear_sigmoid and linear_bce_with_logits: Triton kernels vs the torch references, with gradients."""

import pytest
import torch

from leader_edge import kernels
from leader_edge.kernels import reference

# (B, D, M): ragged against the pinned 16-wide tiles; B = 1; M = 1.
SHAPES = [(21, 37, 45), (1, 16, 3), (33, 70, 1), (50, 24, 67)]


def make_inputs(shape, dtype, device, bias: bool, seed: int):
    b, d, m = shape
    gen = torch.Generator().manual_seed(seed)

    def leaf(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_()

    x, weight = leaf(b, d), leaf(m, d, scale=d**-0.5)
    target = (torch.rand(b, m, generator=gen) < 0.3).float().to(device)
    return x, weight, (leaf(m) if bias else None), target, gen


def grads(out, inputs, grad=None):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, grad)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_sigmoid_matches_reference(shape, dtype, bias, device, close):
    x, weight, b, _, gen = make_inputs(shape, dtype, device, bias, seed=SHAPES.index(shape))
    out = kernels.linear_sigmoid(x, weight, b, backend="triton")
    expected = reference.linear_sigmoid(x, weight, b)
    grad = torch.randn(expected.shape, generator=gen).to(device=device, dtype=dtype)
    assert out.dtype == dtype and out.shape == expected.shape
    close(out, expected, dtype)
    for actual, want in zip(grads(out, (x, weight, b), grad), grads(expected, (x, weight, b), grad)):
        close(actual, want, dtype)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_bce_with_logits_matches_reference(shape, dtype, bias, device, close):
    x, weight, b, target, _ = make_inputs(shape, dtype, device, bias, seed=100 + SHAPES.index(shape))
    loss = kernels.linear_bce_with_logits(x, weight, b, target, backend="triton")
    expected = reference.linear_bce_with_logits(x, weight, b, target)
    assert loss.dtype == torch.float32 and loss.shape == ()
    close(loss, expected, torch.float32 if dtype == torch.float32 else dtype)
    # A non-unit upstream gradient checks that backward scales by it.
    for actual, want in zip(grads(3 * loss, (x, weight, b)), grads(3 * expected, (x, weight, b))):
        close(actual, want, dtype)


def test_linear_bce_with_logits_without_grad_matches_and_backward_repeats(close):
    x, weight, b, target, _ = make_inputs((19, 23, 29), torch.float32, "cpu", True, seed=7)
    with torch.no_grad():  # WRITE_GRAD off: no dlogits buffer at all
        close(kernels.linear_bce_with_logits(x, weight, b, target, backend="triton"),
              reference.linear_bce_with_logits(x, weight, b, target), torch.float32)
    loss = kernels.linear_bce_with_logits(x, weight, b, target, backend="triton")
    first = grads(loss, (x, weight, b))
    loss2 = kernels.linear_bce_with_logits(x, weight, b, target, backend="triton")
    loss2.backward(retain_graph=True)
    once = [t.grad.clone() for t in (x, weight, b)]
    loss2.backward()
    for a, g1, g2 in zip(first, once, (x.grad, weight.grad, b.grad)):
        torch.testing.assert_close(a, g1)
        torch.testing.assert_close(2 * g1, g2)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy inside the interpreter's sigmoid
def test_linear_bce_with_logits_extreme_logits_stay_finite():
    x = torch.tensor([[1.0], [-1.0]]) * 500  # logits of +-500: naive log(sigmoid) gives inf
    weight, target = torch.ones(1, 1, requires_grad=True), torch.tensor([[0.0], [1.0]])
    loss = kernels.linear_bce_with_logits(x, weight, None, target, backend="triton")
    torch.testing.assert_close(loss, reference.linear_bce_with_logits(x, weight, None, target))
    loss.backward()
    assert torch.isfinite(weight.grad).all()


def test_linear_rejects_bad_shapes():
    x, weight = torch.randn(4, 5), torch.randn(3, 5)
    with pytest.raises(ValueError, match="weight"):
        kernels.linear_sigmoid(x, torch.randn(3, 6))
    with pytest.raises(ValueError, match="bias"):
        kernels.linear_sigmoid(x, weight, torch.randn(4))
    with pytest.raises(ValueError, match="target"):
        kernels.linear_bce_with_logits(x, weight, None, torch.rand(4, 4))
