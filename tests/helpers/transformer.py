"""A toy transformer for the K-FAC and linearization tests: explicit Linear attention projections (listed in
``projection_names``), LayerNorm, a GELU MLP, and a class token and position embedding held by the root."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ToyAttention(nn.Module):
    projection_names = ("q", "k", "v", "out")

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        weights = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / x.shape[-1] ** 0.5, dim=-1)
        return self.out(weights @ self.v(x))


class ToyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.attention = nn.LayerNorm(dim), ToyAttention(dim)
        self.norm2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(),
                                                                  nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ToyTransformer(nn.Module):
    """Tokens in, classes out: embedding, a class token and position embedding held by the root, blocks, head."""

    def __init__(self, dim: int = 8, tokens: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.1)
        self.blocks = nn.Sequential(ToyBlock(dim), ToyBlock(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x)
        tokens = torch.cat([self.class_token.expand(len(x), -1, -1), tokens], dim=1) + self.position
        return self.head(self.norm(self.blocks(tokens))[:, 0])
