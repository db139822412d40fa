"""wide_max_head and wide_max_head_loss: Triton kernels vs the torch reference, with every gradient."""

import pytest
import torch

from leader_edge import kernels
from leader_edge.kernels import reference

# (B, D, M, V, L): ragged against the pinned 16-wide tiles; B = 1 with L = 1; M = 1.
SHAPES = [(21, 37, 45, 30, 7), (1, 16, 3, 5, 1), (33, 20, 1, 9, 4)]


def make_inputs(shape, dtype, device, seed: int, *, ties: bool = True):
    """Leaves h, weight, bias, table, extra (requires_grad), codes, target. Table values are rounded
    to halves when `ties`, so many slots tie at the max; bag 0 is empty, bag 1 one code repeated."""
    b, d, m, v, length = shape
    gen = torch.Generator().manual_seed(seed)

    def leaf(*size, scale=1.0):
        t = torch.randn(*size, generator=gen) * scale
        return t.to(device=device, dtype=dtype).requires_grad_()

    table = torch.randn(v, m, generator=gen)
    table = (table * 2).round() / 2 if ties else table
    codes = torch.randint(0, v, (b, length), generator=gen)
    codes[torch.rand(b, length, generator=gen) < 0.3] = -1
    codes[0] = -1
    if b > 1:
        codes[1] = codes[1, 0].clamp(min=0)
    target = (torch.rand(b, m, generator=gen) < 0.3).float().to(device)
    return (leaf(b, d), leaf(m, d, scale=d**-0.5), leaf(m), table.to(device=device, dtype=dtype).requires_grad_(),
            codes.to(device), leaf(b, m), target, gen)


def grads(out, inputs, grad=None):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, grad)


@pytest.mark.parametrize("sigmoid", [False, True], ids=["logits", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_wide_max_head_matches_reference(shape, dtype, sigmoid, device, close):
    h, weight, bias, table, codes, extra, _, gen = make_inputs(shape, dtype, device, SHAPES.index(shape))
    out = kernels.wide_max_head(h, weight, bias, table, codes, extra, sigmoid, backend="triton")
    expected = reference.wide_max_head(h, weight, bias, table, codes, extra, sigmoid)
    assert out.dtype == dtype and out.shape == expected.shape
    close(out, expected, dtype)
    grad = torch.randn(expected.shape, generator=gen).to(device=device, dtype=dtype)
    leaves = (h, weight, bias, table, extra)
    for actual, want in zip(grads(out, leaves, grad), grads(expected, leaves, grad)):
        close(actual, want, dtype)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "sorted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_wide_max_head_loss_matches_reference(shape, dtype, deterministic, device, close, monkeypatch):
    h, weight, bias, table, codes, extra, target, _ = make_inputs(shape, dtype, device, 10 + SHAPES.index(shape))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    loss, prob = kernels.wide_max_head_loss(h, weight, bias, table, codes, extra, target, backend="triton")
    want_loss, want_prob = reference.wide_max_head_loss(h, weight, bias, table, codes, extra, target)
    assert loss.dtype == prob.dtype == torch.float32 and loss.shape == () and not prob.requires_grad
    close(loss, want_loss, torch.float32 if dtype == torch.float32 else dtype)
    close(prob, want_prob, torch.float32 if dtype == torch.float32 else dtype)
    leaves = (h, weight, bias, table, extra)  # a non-unit upstream gradient checks that backward scales by it
    for actual, want in zip(grads(3 * loss, leaves), grads(3 * want_loss, leaves)):
        close(actual, want, dtype)


@pytest.mark.parametrize("parts", ["no-table", "no-extra", "no-bias"])
def test_wide_max_head_optional_parts_match_reference(parts, close):
    h, weight, bias, table, codes, extra, target, _ = make_inputs(SHAPES[0], torch.float32, "cpu", 20)
    table, codes = (None, None) if parts == "no-table" else (table, codes)
    extra = None if parts == "no-extra" else extra
    bias = None if parts == "no-bias" else bias
    leaves = (h, weight, bias, table, extra)
    loss, prob = kernels.wide_max_head_loss(h, weight, bias, table, codes, extra, target, backend="triton")
    want_loss, want_prob = reference.wide_max_head_loss(h, weight, bias, table, codes, extra, target)
    close(loss, want_loss, torch.float32)
    close(prob, want_prob, torch.float32)
    for actual, want in zip(grads(loss, leaves), grads(want_loss, leaves)):
        close(actual, want, torch.float32)


def test_wide_max_head_ties_split_the_gradient_like_amax():
    # A zero table (the student's wide init) ties every slot: bag [a, a, b] gives row a 2/3, row b 1/3.
    table = torch.zeros(4, 2, requires_grad=True)
    h, weight = torch.zeros(1, 3), torch.zeros(2, 3)
    codes = torch.tensor([[1, 1, 3, -1]])
    out = kernels.wide_max_head(h, weight, None, table, codes, backend="triton")
    (grad,) = torch.autograd.grad(out, table, torch.tensor([[3.0, 6.0]]))
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0], [2.0, 4.0], [0.0, 0.0], [1.0, 2.0]]))


def test_wide_max_head_sorted_backward_is_bit_reproducible(monkeypatch):
    h, weight, bias, table, codes, extra, target, _ = make_inputs((40, 9, 21, 6, 11), torch.float32, "cpu", 40)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    runs = [torch.autograd.grad(kernels.wide_max_head_loss(h, weight, bias, table, codes, extra, target, backend="triton")[0],
                                table)[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy inside the interpreter's sigmoid
def test_wide_max_head_loss_extreme_logits_stay_finite():
    h = torch.tensor([[1.0], [-1.0]]) * 500  # logits of +-500: a naive log(sigmoid) gives inf
    weight, target = torch.ones(1, 1, requires_grad=True), torch.tensor([[0.0], [1.0]])
    loss, prob = kernels.wide_max_head_loss(h, weight, None, None, None, None, target, backend="triton")
    want_loss, want_prob = reference.wide_max_head_loss(h, weight, None, None, None, None, target)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(prob, want_prob)
    loss.backward()
    assert torch.isfinite(weight.grad).all()


def test_wide_max_head_empty_bags_batches_and_codes():
    h, weight, table = torch.randn(3, 4), torch.randn(5, 4), torch.randn(6, 5, requires_grad=True)
    for codes in (torch.full((3, 2), -1), torch.zeros((3, 0), dtype=torch.int64)):  # all padding; L = 0
        out = kernels.wide_max_head(h, weight, None, table, codes, backend="triton")
        torch.testing.assert_close(out, h @ weight.T)
        (grad,) = torch.autograd.grad(out.sum(), table)
        assert torch.all(grad == 0)
    empty = kernels.wide_max_head(h[:0], weight, None, table, torch.zeros((0, 2), dtype=torch.int64), backend="triton")
    assert empty.shape == (0, 5)


def test_wide_max_head_no_grad_and_repeated_backward(close):
    h, weight, bias, table, codes, extra, target, _ = make_inputs(SHAPES[0], torch.float32, "cpu", 30)
    with torch.no_grad():  # nothing saved for backward: the max and its ties are not written
        loss, _ = kernels.wide_max_head_loss(h, weight, bias, table, codes, extra, target, backend="triton")
    close(loss, reference.wide_max_head_loss(h, weight, bias, table, codes, extra, target)[0], torch.float32)
    loss, _ = kernels.wide_max_head_loss(h, weight, bias, table, codes, extra, target, backend="triton")
    loss.backward(retain_graph=True)
    once = table.grad.clone()
    loss.backward()
    torch.testing.assert_close(table.grad, 2 * once)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_wide_max_head_out_of_range_code_fails_the_same_on_every_device(backend, device):
    # A code >= V is refused on the host before anything runs: the same ValueError on CPU and CUDA.
    h, weight, table = torch.randn(2, 3, device=device), torch.randn(4, 3, device=device), torch.randn(5, 4, device=device)
    codes = torch.tensor([[0, 5], [1, -1]], device=device)
    with pytest.raises(ValueError, match="code 5 is out of range for a table with V = 5"):
        kernels.wide_max_head(h, weight, None, table, codes, backend=backend)
    with pytest.raises(ValueError, match="code 5 is out of range"):
        kernels.wide_max_head_loss(h, weight, None, table, codes, None, torch.zeros(2, 4, device=device), backend=backend)
    with pytest.raises(ValueError, match="code 5 is out of range for a table with V = 5"):
        kernels.embedding_bag(table, codes, backend=backend)


def test_wide_max_head_rejects_bad_shapes():
    h, weight, table, codes = torch.randn(2, 3), torch.randn(4, 3), torch.randn(5, 4), torch.tensor([[0, 1], [1, -1]])
    with pytest.raises(ValueError, match="table"):
        kernels.wide_max_head(h, weight, None, torch.randn(5, 3), codes)
    with pytest.raises(ValueError, match="codes"):
        kernels.wide_max_head(h, weight, None, table, codes.int())
    with pytest.raises(ValueError, match="extra"):
        kernels.wide_max_head(h, weight, None, table, codes, torch.randn(2, 5))
    with pytest.raises(ValueError, match="target"):
        kernels.wide_max_head_loss(h, weight, None, table, codes, None, torch.randn(3, 4))


def test_wide_max_head_module_matches_the_functions():
    torch.manual_seed(0)
    head = kernels.WideMaxHead(6, 4, 9, backend="triton")
    with torch.no_grad():
        head.table.normal_()
    h, codes, target = torch.randn(3, 6), torch.tensor([[0, 8, -1], [-1, -1, -1], [3, 3, 3]]), torch.ones(3, 4)
    expected = reference.wide_max_head(h, head.weight, head.bias, head.table, codes, None, True)
    torch.testing.assert_close(head(h, codes), expected)
    loss, prob = head.loss(h, codes, target)
    torch.testing.assert_close(prob, expected)
    torch.testing.assert_close(loss, reference.wide_max_head_loss(h, head.weight, head.bias, head.table, codes, None, target)[0])
