"""nn.Module wrappers that own their parameters and call the kernels (one module per op)."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import embedding_bag, wide_max_head, wide_max_head_loss


class EmbeddingBag(nn.Module):
    """A [num_embeddings, dim] table reduced over -1-padded code lists: codes [B, L] -> [B, dim]."""

    def __init__(self, num_embeddings: int, dim: int, mode: str = "mean", backend: str = "auto") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_embeddings, dim) * 0.02)
        self.mode, self.backend = mode, backend

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return embedding_bag(self.weight, codes, self.mode, backend=self.backend)


class WideMaxHead(nn.Module):
    """The student's head as a module: Linear(in_features, out_features) + the masked max of
    per-code logit rows [num_codes, out_features]; h [B, in_features], codes [B, L] -> [B, out_features]."""

    def __init__(self, in_features: int, out_features: int, num_codes: int, backend: str = "auto") -> None:
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        self.table = nn.Parameter(torch.zeros(num_codes, out_features))  # 0: the student's wide path starts silent
        self.backend = backend

    def forward(self, h: torch.Tensor, codes: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities [B, out_features]."""
        return wide_max_head(h, self.weight, self.bias, self.table, codes, extra, sigmoid=True, backend=self.backend)

    def loss(self, h: torch.Tensor, codes: torch.Tensor, target: torch.Tensor, extra: torch.Tensor | None = None):
        """(mean BCE-with-logits against target [B, out_features], probabilities)."""
        return wide_max_head_loss(h, self.weight, self.bias, self.table, codes, extra, target, backend=self.backend)
