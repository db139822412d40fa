"""Backend selection: auto/torch/triton, the errors, and that importing never needs triton."""

import os
import subprocess
import sys

import pytest
import torch

from leader_edge import kernels
from leader_edge.kernels import reference


def test_dispatch_unknown_backend_names_the_allowed_values():
    with pytest.raises(ValueError, match=r"'auto', 'triton', 'torch'"):
        kernels.wide_max_head(torch.randn(2, 3), torch.randn(4, 3), None, None, None, backend="cuda")


def test_dispatch_auto_on_cpu_runs_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(reference, "embedding_bag", lambda *a: calls.append("bag") or torch.zeros(1, 1))
    monkeypatch.setattr(reference, "wide_max_head", lambda *a: calls.append("head") or torch.zeros(1, 1))
    monkeypatch.setattr(reference, "wide_max_head_loss", lambda *a: calls.append("loss") or torch.zeros(()))
    x, w, table, codes = torch.randn(2, 3), torch.randn(4, 3), torch.randn(5, 4), torch.tensor([[0, -1], [4, 4]])
    kernels.embedding_bag(w, torch.tensor([[0, -1]]))
    kernels.wide_max_head(x, w, None, table, codes, backend="torch")
    kernels.wide_max_head_loss(x, w, None, table, codes, None, torch.zeros(2, 4))
    assert calls == ["bag", "head", "loss"]


def test_dispatch_import_and_auto_on_cpu_never_load_triton_and_forced_triton_needs_the_interpreter():
    # A fresh process: in this one the interpreter is on and triton is already imported.
    script = (
        "import sys, torch\n"
        "from leader_edge import kernels\n"
        "w = torch.randn(5, 3, requires_grad=True)\n"
        "kernels.embedding_bag(w, torch.tensor([[1, -1]]), 'mean').sum().backward()\n"
        "print('triton' in sys.modules)\n"
        "try:\n"
        "    kernels.embedding_bag(w, torch.tensor([[1, -1]]), backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('TRITON_INTERPRET=1' in str(e))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]


def test_dispatch_modules_match_the_functions():
    torch.manual_seed(0)
    bag, head = kernels.EmbeddingBag(9, 6, backend="triton"), kernels.WideMaxHead(6, 4, 9, backend="triton")
    codes = torch.tensor([[0, 8, -1], [-1, -1, -1], [3, 3, 3]])
    prob = head(bag(codes), codes)
    expected = reference.wide_max_head(reference.embedding_bag(bag.weight, codes, "mean"), head.weight, head.bias,
                                       head.table, codes, None, True)
    torch.testing.assert_close(prob, expected)
