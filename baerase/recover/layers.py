"""Layers stacked over candidate classes: one independent copy per class, run as one bmm."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import rng


class StackedLinear(nn.Module):
    """K independent linear layers: x [K, N, in] -> [K, N, out]."""

    def __init__(self, stacks: int, in_features: int, out_features: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default init, per stack
        self.weight = nn.Parameter(rng.uniform_(torch.empty(stacks, in_features, out_features), -bound, bound))
        self.bias = nn.Parameter(rng.uniform_(torch.empty(stacks, 1, out_features), -bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class StackedBatchNorm(nn.Module):
    """Batch normalisation over N for each of K stacks, always with batch statistics: generators
    are only ever run on batches of latent samples, so running statistics are never needed."""

    def __init__(self, stacks: int, features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(stacks, 1, features))
        self.bias = nn.Parameter(torch.zeros(stacks, 1, features))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=1, keepdim=True, unbiased=False)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
