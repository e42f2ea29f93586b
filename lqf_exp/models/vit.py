"""A small pre-LayerNorm Vision Transformer written for LQF: every weight sits in a plain module.

``nn.MultiheadAttention`` keeps its q/k/v projections in one ``in_proj_weight`` used through a functional call
(K-FAC's forward/backward hooks on ``nn.Linear`` never see them) and dispatches, at inference, to a fused kernel
with no forward-mode AD. Here q, k, v and the output projection are four ``nn.Linear`` and attention is computed
explicitly (matmul, softmax, matmul), so hooks reach every projection and ``torch.func.jvp`` goes through the whole
network. Non-linearities are modules (``activation()``), so ``swap_activations`` and the ablations see them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .activations import ActivationFactory, make_activation

__all__ = ["Attention", "Block", "MLP", "PatchEmbedding", "VisionTransformer", "vit_tiny"]


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v`` and ``out`` projections (all ``nn.Linear``)."""

    projection_names = ("q", "k", "v", "out")  # what method.linearize=attention linearizes (TAFT)

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViT width {dim} must be divisible by the number of heads {heads}")
        self.heads = heads
        self.scale = 1.0 / math.sqrt(dim // heads)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        """``[B, N, D]`` → ``[B, heads, N, D/heads]``."""
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        # Explicit scores rather than F.scaled_dot_product_attention: every op here has a forward-mode AD rule,
        # whatever kernel SDPA would pick on the device.
        weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        context = (weights @ v).transpose(1, 2)
        return self.out(context.reshape(x.shape))


class MLP(nn.Module):
    """``Linear → activation → Linear``; the linears are not named ``fc*`` so no prefix looks like the head's."""

    def __init__(self, dim: int, hidden: int, act: ActivationFactory) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.act = act()
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.act(self.linear1(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (out-of-place sums)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, act: ActivationFactory) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbedding(nn.Module):
    """Patches by a ``Conv2d(kernel=stride=patch)``, a class token in front, plus a learned position embedding.

    The class token and position embedding are parameters of this module itself (not of a Linear/Conv child):
    LQF's fused tangent path has a dual module for it (``lqf_exp.tangent_vit.DualPatchEmbedding``: their tangent is
    their δ, or zero when frozen).
    Holding them here rather than on the network keeps every parameter inside a top-level child, so the block
    names (``embed``, ``block1``…, ``norm``, ``head``) cover all weights for ``method.linearize=<block>``.
    """

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"ViT image size {image_size} must be a multiple of the patch size {patch_size}")
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch_size) ** 2 + 1, dim))
        # Small random init (ViT's std 0.02): a zero class token would make the heads' first scores all equal.
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]
        if tokens.shape[1] + 1 != self.pos_embed.shape[1]:
            raise ValueError(
                f"ViT built for {self.pos_embed.shape[1] - 1} patches got an image giving {tokens.shape[1]}: "
                f"input {tuple(x.shape[-2:])} does not match the model's image size"
            )
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed


class VisionTransformer(nn.Module):
    """ViT classifier: ``embed`` → ``block1..blockN`` → ``norm`` → ``head`` on the class token.

    Blocks are top-level children (like a ResNet's ``layer1..layer4``), so ``method.linearize=block4`` linearizes
    the last block onward. ``head_name`` tells :func:`lqf_exp.models.heads.head_name` where the head is.
    """

    head_name = "head"

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        activation: ActivationFactory | None = None,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"ViT depth must be >= 1, got {depth}")
        act = activation or make_activation("gelu")
        self.depth = depth
        self.embed = PatchEmbedding(image_size, patch_size, in_channels, dim)
        for i in range(1, depth + 1):
            self.add_module(f"block{i}", Block(dim, heads, mlp_ratio, act))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        for i in range(1, self.depth + 1):
            x = getattr(self, f"block{i}")(x)
        return self.head(self.norm(x)[:, 0])


def vit_tiny(
    num_classes: int = 10, activation: ActivationFactory | None = None, **kw: int | float
) -> VisionTransformer:
    """32-px inputs, 4-px patches (64 tokens + class token), width 64, 4 blocks of 4 heads, MLP ratio 2 (~140k
    parameters): small enough to fine-tune on two CPU cores."""
    config: dict[str, int | float] = {"image_size": 32, "patch_size": 4, "dim": 64, "depth": 4, "heads": 4,
                                      "mlp_ratio": 2.0, **kw}
    return VisionTransformer(num_classes=num_classes, activation=activation, **config)  # type: ignore[arg-type]
