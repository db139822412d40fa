"""Kernel tests: Triton under the CPU interpreter, autotune pinned, every fresh buffer poisoned."""

import os

# Read when the kernels are decorated (first Triton call), so set before any test imports them.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LEADER_EDGE_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# (atol, rtol) per dtype. fp32: only summation order differs. bf16: outputs are rounded to 8
# mantissa bits (one ulp = 0.4-0.8 % relative) and the Triton backward rounds dlogits to bf16
# before its matmuls, so gradients get a few ulps.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2)}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """torch.empty returns NaN-filled float tensors, so an element a kernel forgets to write fails."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.fixture
def close():
    """assert_close(actual, expected, dtype) with the tolerance table above."""

    def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
        atol, rtol = TOLERANCES[dtype]
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)

    return check


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every kernel case runs on the CPU interpreter and, where there is one, on a CUDA device."""
    return request.param
