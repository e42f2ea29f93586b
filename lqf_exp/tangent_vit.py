"""Fused tangent rules for vision transformers: the dual modules :func:`lqf_exp.tangent.build_dual` uses for
LayerNorm, smooth activations, attention and the modules that add parameters of their own (class token, position
embedding).

The stacked tensor ``z = [primal; tangent]`` goes through a module unchanged only when the module is linear in its
input or acts on each sample alone with a rule (:mod:`lqf_exp.tangent`). Attention mixes tokens through a product
of two activations (``q kᵀ``) and a softmax, and the embeddings *add* parameters, whose tangent is δ (or zero when
frozen), not the parameter itself; so each of these gets a dual module of its own, recognised by its exact class
(a subclass may compute something else; it takes the generic path, which the first-batch check then judges):

- :class:`DualLayerNorm`: ``x̂·γ + β`` on the primal; ``γ·(ṫ − mean ṫ − x̂·mean(x̂ ṫ))/σ + x̂·δγ + δβ`` on the tangent.
- :class:`DualSmoothActivation` (GELU exact or tanh, SiLU, Tanh, Sigmoid): ``φ(p)`` and ``φ'(p)·t`` through the
  activation's own backward kernel (``gelu_backward(t, p)`` is ``t·GELU'(p)``, the derivative of the erf form).
- :class:`DualAttention` (:class:`lqf_exp.models.vit.Attention`) and :class:`DualExplicitSelfAttention`
  (torchvision's attention converted by :mod:`lqf_exp.models.explicit_attention`): q, k, v from dual Linear
  layers, then ``ṡ = (q̇kᵀ + qk̇ᵀ)·scale``, ``ȧ = a⊙(ṡ − Σ a⊙ṡ)``, ``ċ = ȧv + av̇``, then the dual ``out``.
- :class:`DualPatchEmbedding`, :class:`DualTorchvisionEncoder`, :class:`DualTorchvisionViT`: the class token and
  position embedding stacked as ``[w0; δ]`` (``[w0; 0]`` when frozen). These re-state their module's forward (a
  few lines, the same operations) for the stacked batch; they patch nothing.

Dropout is not computed: the dual tree is the network at w0 in eval mode, which LinearizedNetwork keeps for good.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.vision_transformer import Encoder as TorchvisionEncoder
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from lqf_exp.models.explicit_attention import ExplicitSelfAttention
from lqf_exp.models.vit import Attention, PatchEmbedding
from lqf_exp.tangent_ops import DualLeaf, LayerNormTangentFunction, UnsupportedModuleError, halves

__all__ = ["SMOOTH_ACTIVATIONS", "DualAttention", "DualContainer", "DualExplicitSelfAttention", "DualLayerNorm",
           "DualPatchEmbedding", "DualSmoothActivation", "DualTorchvisionEncoder", "DualTorchvisionViT",
           "container_rule"]

SMOOTH_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid)


def _pair(w0: Tensor, delta: Tensor | None) -> Tensor:
    """``[w0; δ]`` (``[w0; 0]`` for a frozen parameter), shaped ``[2, *w0.shape]``: what an added parameter
    contributes to the primal and the tangent half."""
    return torch.stack([w0, torch.zeros_like(w0) if delta is None else delta.to(w0.dtype)])


class DualLayerNorm(DualLeaf):
    """LayerNorm on ``z``; δγ, δβ (``bn_affine=linearize``) add ``x̂·δγ + δβ`` to the tangent."""

    def forward(self, z: Tensor) -> Tensor:
        ln = self.base
        primal, tangent = halves(z)
        primal = primal.detach()  # the primal carries no gradient to δ
        if torch.is_autocast_enabled(z.device.type):
            primal, tangent = primal.float(), tangent.float()  # normalize in float32, as CUDA autocast does
        shape = list(ln.normalized_shape)
        d_gamma, d_beta = self.delta("weight"), self.delta("bias")
        if d_gamma is None:  # x̂ itself is not needed: the primal's affine map in the same kernel
            p_out, mean, rstd = torch.ops.aten.native_layer_norm(primal, shape, ln.weight, ln.bias, ln.eps)
        else:
            normalized, mean, rstd = torch.ops.aten.native_layer_norm(primal, shape, None, None, ln.eps)
            p_out = normalized if ln.weight is None else normalized * ln.weight
            p_out = p_out if ln.bias is None else p_out + ln.bias
        t_out = LayerNormTangentFunction.apply(tangent.contiguous(), primal, mean, rstd, ln.weight, shape)
        if d_gamma is not None:
            t_out = t_out + normalized * d_gamma
        if d_beta is not None:
            t_out = t_out + d_beta
        return torch.cat([p_out, t_out.to(p_out.dtype)])


class DualSmoothActivation(nn.Module):
    """``[φ(p); φ'(p)·t]``, ``φ'(p)·t`` by the activation's backward kernel with ``t`` as the "gradient"."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not isinstance(base, SMOOTH_ACTIVATIONS):
            raise UnsupportedModuleError(f"no smooth-activation rule for {type(base).__name__}")
        self.kind = type(base).__name__
        self.approximate = str(getattr(base, "approximate", "none"))

    def forward(self, z: Tensor) -> Tensor:
        primal, tangent = halves(z)
        primal = primal.detach()
        if self.kind == "GELU":
            out = F.gelu(primal, approximate=self.approximate)
            return torch.cat([out, torch.ops.aten.gelu_backward(tangent, primal, approximate=self.approximate)])
        if self.kind == "SiLU":
            return torch.cat([F.silu(primal), torch.ops.aten.silu_backward(tangent, primal)])
        if self.kind == "Tanh":
            out = torch.tanh(primal)
            return torch.cat([out, torch.ops.aten.tanh_backward(tangent, out)])
        out = torch.sigmoid(primal)
        return torch.cat([out, torch.ops.aten.sigmoid_backward(tangent, out)])

    def extra_repr(self) -> str:
        return self.kind + (f", approximate={self.approximate!r}" if self.kind == "GELU" else "")


class DualContainer(DualLeaf):
    """A dual module with dual children (built by :func:`lqf_exp.tangent.build_dual`, registered here).
    ``plain_child``: the child that takes the module's input when that input is a plain batch (the first
    linearized block); None: the module needs a stacked input (``[x; 0]`` is stacked in front)."""

    plain_child: str | None = None

    def __init__(self, base: nn.Module, deltas: nn.ParameterDict, keys: dict[str, str],
                 children: dict[str, nn.Module]) -> None:
        super().__init__(base, deltas, keys)
        for name, child in children.items():
            self.add_module(name, child)


class DualAttention(DualContainer):
    """Multi-head self-attention on ``z``: the softmax's and the two products' tangents, written out."""

    def __init__(self, base: nn.Module, deltas: nn.ParameterDict, keys: dict[str, str],
                 children: dict[str, nn.Module]) -> None:
        if set(children) != {"q", "k", "v", "out"}:
            raise UnsupportedModuleError(f"attention {type(base).__name__} with children {sorted(children)}")
        super().__init__(base, deltas, keys, children)
        self.heads = int(base.heads)
        self.scale: float | None = getattr(base, "scale", None)  # Attention's; else 1/√(head width)

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[2B, N, D]`` → primal and tangent, each ``[B, heads, N, D/heads]``."""
        two_b, n, d = x.shape
        primal, tangent = x.view(2, two_b // 2, n, self.heads, d // self.heads).transpose(2, 3).unbind(0)
        return primal.detach(), tangent

    def attend(self, z: Tensor) -> Tensor:
        (q, dq), (k, dk), (v, dv) = self._heads(self.q(z)), self._heads(self.k(z)), self._heads(self.v(z))
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        q, dq = q * scale, dq * scale  # scaled on [B, h, N, d] rather than on the [B, h, N, N] scores
        weights = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        d_scores = (dq @ k.transpose(-2, -1)).add_(q @ dk.transpose(-2, -1))
        # softmax's Jacobian a⊙(ṡ − Σ a⊙ṡ) is symmetric: its backward kernel is its forward tangent, and its adjoint
        d_weights = torch.ops.aten._softmax_backward_data(d_scores, weights, -1, weights.dtype)
        context, d_context = weights @ v, (d_weights @ v).add_(weights.to(dv.dtype) @ dv)
        batch, heads, tokens, width = context.shape
        mixed = d_context.new_empty(2, batch, tokens, heads, width)  # [2, B, N, h, d]: one copy, no cat
        mixed[0].copy_(context.transpose(1, 2))
        mixed[1].copy_(d_context.transpose(1, 2))
        return self.out(mixed.view(2 * batch, tokens, heads * width))

    def forward(self, z: Tensor) -> Tensor:
        return self.attend(z)


class DualExplicitSelfAttention(DualAttention):
    """:class:`DualAttention` called as torchvision's ``EncoderBlock`` calls its attention: ``(x, x, x)`` →
    ``(output, None)``."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor,  # type: ignore[override]
                need_weights: bool = False) -> tuple[Tensor, None]:
        if need_weights:
            raise ValueError("ExplicitSelfAttention does not return attention weights")
        if key is not query or value is not query:
            raise UnsupportedModuleError("the fused attention rule covers self-attention (query is key is value)")
        return self.attend(query), None


def _class_token(w0: Tensor, delta: Tensor | None, batch: int) -> Tensor:
    """``[cls; δcls]`` expanded to the stacked batch: ``[2B, 1, D]``."""
    pair = _pair(w0, delta)  # [2, 1, 1, D]
    return pair.expand(2, batch, *w0.shape[1:]).reshape(2 * batch, *w0.shape[1:])


class DualPatchEmbedding(DualContainer):
    """:class:`lqf_exp.models.vit.PatchEmbedding` on the stacked batch (its ``proj`` may take the plain images)."""

    plain_child = "proj"

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # [2B, N, D]
        pos = self.base.pos_embed
        if tokens.shape[1] + 1 != pos.shape[1]:
            raise ValueError(
                f"ViT built for {pos.shape[1] - 1} patches got an image giving {tokens.shape[1]}: "
                f"input {tuple(x.shape[-2:])} does not match the model's image size")
        cls = _class_token(self.base.cls_token, self.delta("cls_token"), tokens.shape[0] // 2)
        out = torch.cat([cls, tokens], dim=1)
        return (halves(out) + _pair(pos, self.delta("pos_embed"))).flatten(0, 1)


class DualTorchvisionEncoder(DualContainer):
    """torchvision's ``Encoder``: ``ln(layers(z + [pos; δpos]))`` (its dropout is off at eval)."""

    def forward(self, z: Tensor) -> Tensor:
        torch._assert(z.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {z.shape}")
        z = (halves(z) + _pair(self.base.pos_embedding, self.delta("pos_embedding"))).flatten(0, 1)
        return self.ln(self.layers(z))


class DualTorchvisionViT(DualContainer):
    """torchvision's ``VisionTransformer`` root (it holds the class token): images in, stacked logits out."""

    plain_child = "conv_proj"

    def forward(self, x: Tensor) -> Tensor:
        base = self.base
        batch, _, height, width = x.shape
        torch._assert(height == base.image_size, f"Wrong image height! Expected {base.image_size} but got {height}!")
        torch._assert(width == base.image_size, f"Wrong image width! Expected {base.image_size} but got {width}!")
        z = self.conv_proj(x)  # [2B, D, h/p, w/p]
        z = z.reshape(z.shape[0], base.hidden_dim, -1).permute(0, 2, 1)
        z = torch.cat([_class_token(base.class_token, self.delta("class_token"), batch), z], dim=1)
        return self.heads(self.encoder(z)[:, 0])


_RULES: dict[type[nn.Module], type[DualContainer]] = {
    Attention: DualAttention, ExplicitSelfAttention: DualExplicitSelfAttention, PatchEmbedding: DualPatchEmbedding,
    TorchvisionEncoder: DualTorchvisionEncoder, TorchvisionViT: DualTorchvisionViT}


def container_rule(module: nn.Module) -> type[DualContainer] | None:
    """The dual module for a container whose forward the stacked batch cannot go through as it is (exact class)."""
    return _RULES.get(type(module))
