"""torchvision's ViT attention with its projections as real ``nn.Linear`` modules (q, k, v, out).

``nn.MultiheadAttention`` applies its input and output projections functionally (``F.multi_head_attention_forward``
on a packed ``in_proj_weight``), so K-FAC's hooks, the Jacobian hooks and curvlinops never see them, and its fused
inference fast path has no forward-mode AD. :func:`use_explicit_attention` swaps every such module of a network for
:class:`ExplicitSelfAttention` with the same weights, once, when the model is built; the outputs are equal
(tests/test_explicit_attention.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ExplicitSelfAttention", "use_explicit_attention"]


class ExplicitSelfAttention(nn.Module):
    """Multi-head self-attention, batch first, with ``q``, ``k``, ``v``, ``out`` as ``nn.Linear``.

    Called like the ``nn.MultiheadAttention`` it replaces in torchvision's ``EncoderBlock``
    (``attention(x, x, x, need_weights=False)``) and returns ``(output, None)``.
    """

    projection_names = ("q", "k", "v", "out")  # what method.linearize=attention linearizes (TAFT)

    def __init__(self, dim: int, heads: int, bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim, bias=bias) for _ in range(4))

    @classmethod
    def from_multihead(cls, attention: nn.MultiheadAttention) -> ExplicitSelfAttention:
        if not attention.batch_first or not attention._qkv_same_embed_dim or attention.bias_k is not None:
            raise ValueError("only batch-first self-attention with one embedding size and no extra k/v bias converts")
        dim = attention.embed_dim
        module = cls(dim, attention.num_heads, bias=attention.in_proj_bias is not None)
        with torch.no_grad():
            for index, projection in enumerate((module.q, module.k, module.v)):
                projection.weight.copy_(attention.in_proj_weight[index * dim:(index + 1) * dim])
                if attention.in_proj_bias is not None:
                    projection.bias.copy_(attention.in_proj_bias[index * dim:(index + 1) * dim])
            module.out.weight.copy_(attention.out_proj.weight)
            if attention.out_proj.bias is not None:
                module.out.bias.copy_(attention.out_proj.bias)
        return module.to(attention.in_proj_weight.dtype)

    def _split(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        return x.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, need_weights: bool = False) -> tuple[Tensor, None]:
        if need_weights:
            raise ValueError("ExplicitSelfAttention does not return attention weights")
        q, k, v = self._split(self.q(query)), self._split(self.k(key)), self._split(self.v(value))
        # written out (no fused SDPA kernel), so forward-mode AD and the tangent path see every operation
        weights = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(query.shape)
        return self.out(mixed), None


def use_explicit_attention(net: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` of ``net`` by its :class:`ExplicitSelfAttention`; the count."""
    targets = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, attention in targets:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        parent.add_module(child, ExplicitSelfAttention.from_multihead(attention))
    return len(targets)
