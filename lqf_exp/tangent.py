"""The fused tangent path of :class:`~lqf_exp.linearize.LinearizedNetwork` (``method.tangent=fused``): dual modules.

Forward-mode AD runs every layer twice (primal, then tangent) plus the ``conv(x, δW)`` term. Here the primal and
tangent streams travel as ONE tensor ``z = [primal; tangent]`` stacked on the batch axis, through a *dual copy* of
the linearized blocks, built once at construction (:func:`build_dual`): the containers keep their class (so their
own ``forward`` code, residual sums included, runs unchanged on ``z``) and every leaf is replaced by its dual
counterpart:

- ``Conv2d``/``Linear`` → :class:`DualConv2d`/:class:`DualLinear`: ``conv(z, W0)`` in one call (the weights are read
  once for both streams), then ``conv(primal, δW) + δb`` is added to the tangent half. The backward pass (a custom
  autograd function, :mod:`lqf_exp.tangent_ops`) differentiates only the tangent half.
- eval ``BatchNorm`` → :class:`DualBatchNorm`: one per-channel scale of ``z`` and a shift of the primal half only.
- ``ReLU``/``LeakyReLU`` → :class:`DualActivation`: ``z`` times the slope mask of the primal half.
- ``MaxPool2d`` → :class:`DualMaxPool2d`: the tangent is gathered at the primal's argmax.
- linear glue (average pooling, flatten, identity) is shared as it is: it acts alike on both halves; dropout
  becomes ``nn.Identity`` (the dual tree is the network at w0 in eval mode; a dropout mask drawn on ``z`` would
  differ between the halves).
- LayerNorm, GELU/SiLU/Tanh/Sigmoid, attention and the ViTs' embeddings (class token, position embedding):
  :mod:`lqf_exp.tangent_vit`.

The dual modules hold no weights of their own. They read w0 from the base network's leaf and δ from the
:class:`~lqf_exp.linearize.LinearizedNetwork`'s ``deltas`` at call time, through references that are not
registered (so no state-dict key, no second copy, and ``torch.func.functional_call`` on ``deltas.*`` reaches
them). Whether a module's input is stacked is fixed at construction: the first linearized block receives the plain
batch, either through a Conv/Linear leaf built for a plain input or through :class:`StackZeroTangent`.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lqf_exp.tangent_ops import (
    DualConvFunction,
    DualLeaf,
    DualLinearFunction,
    UnsupportedModuleError,
    autocast_inputs,
    halves,
)
from lqf_exp.tangent_vit import SMOOTH_ACTIVATIONS, DualLayerNorm, DualSmoothActivation, container_rule

__all__ = ["DualActivation", "DualBatchNorm", "DualConv2d", "DualLinear", "DualMaxPool2d", "StackZeroTangent",
           "UnsupportedModuleError", "build_dual", "copy_container", "fused_supports"]

# Modules that are linear maps applied alike to every sample: they act on z = [primal; tangent] as they are.
_LINEAR_PASSTHROUGH = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)
_RULED = (nn.Conv2d, nn.Linear, _BatchNorm, nn.LayerNorm, nn.ReLU, nn.LeakyReLU, nn.MaxPool2d, *SMOOTH_ACTIVATIONS)


def fused_supports(module: nn.Module) -> bool:
    """Whether ``module`` (a leaf) has a fused tangent rule or is linear glue that needs none (the variants the rules
    refuse — non-zero padding modes, max-pool returning indices — count as unsupported)."""
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return False
    if isinstance(module, nn.MaxPool2d) and module.return_indices:
        return False
    return isinstance(module, _RULED + _LINEAR_PASSTHROUGH)


class DualConv2d(DualLeaf):
    """``[conv(p, W0) + b0; conv(t, W0) + conv(p, δW) + δb]``; ``plain_input``: the input is ``p`` alone (t = 0)."""

    def __init__(self, base: nn.Conv2d, deltas: nn.ParameterDict, keys: dict[str, str], plain_input: bool) -> None:
        super().__init__(base, deltas, keys)
        self.args = (base.stride, base.padding, base.dilation, base.groups)
        self.plain_input = plain_input

    def forward(self, z: Tensor) -> Tensor:
        inputs = autocast_inputs(z, self.delta("weight"), self.delta("bias"), self.base.weight, self.base.bias)
        return DualConvFunction.apply(*inputs, self.args, not self.plain_input)


class DualLinear(DualLeaf):
    """The ``Linear`` counterpart of :class:`DualConv2d`."""

    def __init__(self, base: nn.Linear, deltas: nn.ParameterDict, keys: dict[str, str], plain_input: bool) -> None:
        super().__init__(base, deltas, keys)
        self.plain_input = plain_input

    def forward(self, z: Tensor) -> Tensor:
        inputs = autocast_inputs(z, self.delta("weight"), self.delta("bias"), self.base.weight, self.base.bias)
        return DualLinearFunction.apply(*inputs, not self.plain_input)


class DualBatchNorm(DualLeaf):
    """Eval BatchNorm on ``z``: scale both halves, shift the primal only; δγ, δβ (``bn_affine=linearize``) add
    ``x̂·δγ + δβ`` to the tangent, ``x̂`` the normalized primal."""

    def forward(self, z: Tensor) -> Tensor:
        bn = self.base
        assert bn.running_var is not None and bn.running_mean is not None  # eval mode, tracked statistics
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        scale = inv_std if bn.weight is None else inv_std * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        view = (1, -1) + (1,) * (z.dim() - 2)
        zv = halves(z)
        shifts = torch.stack([shift, torch.zeros_like(shift)]).view((2, 1, -1) + view[2:])
        out = torch.addcmul(shifts.to(z.dtype), zv, scale.view((1,) + view).to(z.dtype))
        d_gamma, d_beta = self.delta("weight"), self.delta("bias")
        if d_gamma is None and d_beta is None:
            return out.view(z.shape)
        extra = torch.zeros((), dtype=z.dtype, device=z.device)
        if d_gamma is not None:
            normalized = (zv[0] - bn.running_mean.view(view)) * inv_std.view(view)
            extra = normalized.to(z.dtype) * d_gamma.view(view).to(z.dtype)
        if d_beta is not None:
            extra = extra + d_beta.view(view).to(z.dtype)
        return torch.cat([out[0], out[1] + extra])


class DualActivation(nn.Module):
    """ReLU/LeakyReLU on ``z``: both halves times the primal's slope mask, in one kernel (the activation's own
    backward op, with the stacked tensor as "gradient": primal·mask = activation(primal), tangent·mask = its JVP)."""

    def __init__(self, negative_slope: float) -> None:
        super().__init__()
        self.negative_slope = float(negative_slope)

    def forward(self, z: Tensor) -> Tensor:
        zv = halves(z)
        mask_of = zv[0].detach().unsqueeze(0)  # the mask holds no gradient
        if self.negative_slope == 0.0:
            return torch.ops.aten.threshold_backward(zv, mask_of, 0.0).view(z.shape)
        return torch.ops.aten.leaky_relu_backward(zv, mask_of, self.negative_slope, False).view(z.shape)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class DualMaxPool2d(nn.Module):
    """Max pooling on ``z``: the primal's maximum, the tangent gathered at the primal's argmax."""

    def __init__(self, base: nn.MaxPool2d) -> None:
        super().__init__()
        self.pool = (base.kernel_size, base.stride, base.padding, base.dilation, base.ceil_mode)

    def forward(self, z: Tensor) -> Tensor:
        primal, tangent = halves(z)
        kernel, stride, padding, dilation, ceil_mode = self.pool
        p_out, index = F.max_pool2d(primal, kernel, stride, padding, dilation, ceil_mode=ceil_mode,
                                    return_indices=True)
        t_out = tangent.flatten(2).gather(2, index.flatten(2)).view_as(p_out)
        return torch.cat([p_out, t_out])


class StackZeroTangent(nn.Module):
    """The entry of a linearized block that is not a Conv/Linear leaf: ``x`` → ``[x; 0]``."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, torch.zeros_like(x)])


def _own_keys(name: str, module: nn.Module, key_of: dict[str, str]) -> dict[str, str]:
    """``module``'s own parameters that have a δ, mapped to their keys in ``deltas``."""
    prefix = f"{name}." if name else ""
    return {p: key_of[prefix + p] for p, _ in module.named_parameters(recurse=False) if prefix + p in key_of}


def _dual_leaf(name: str, module: nn.Module, deltas: nn.ParameterDict, key_of: dict[str, str],
               plain_input: bool) -> nn.Module:
    keys = _own_keys(name, module, key_of)
    if not fused_supports(module):
        raise UnsupportedModuleError(f"fused tangent: module {name!r} ({type(module).__name__}) has no fused rule; "
                                     "use method.tangent=autodiff")
    if isinstance(module, nn.Conv2d):
        return DualConv2d(module, deltas, keys, plain_input)
    if isinstance(module, nn.Linear):
        return DualLinear(module, deltas, keys, plain_input)
    if plain_input:  # not reached: build_dual wraps a plain-input module of another kind in StackZeroTangent
        raise AssertionError(name)
    if isinstance(module, _BatchNorm):
        return DualBatchNorm(module, deltas, keys)
    if isinstance(module, nn.LayerNorm):
        return DualLayerNorm(module, deltas, keys)
    if isinstance(module, SMOOTH_ACTIVATIONS):
        return DualSmoothActivation(module)
    if isinstance(module, (nn.ReLU, nn.LeakyReLU)):
        return DualActivation(module.negative_slope if isinstance(module, nn.LeakyReLU) else 0.0)
    if isinstance(module, nn.MaxPool2d):
        return DualMaxPool2d(module)
    if isinstance(module, nn.Dropout):
        return nn.Identity()
    return module  # linear glue, shared: it has no parameters


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def copy_container(module: nn.Module, children: Mapping[str, nn.Module]) -> nn.Module:
    """A module of ``module``'s class and settings whose children are ``children``, without hooks: ``module``'s own
    ``forward`` code run on other children. Its own parameters and buffers stay shared with ``module`` (the same
    dicts, so ``.to()`` and ``functional_call`` on either reach both)."""
    copied = copy.copy(module)
    copied._modules = OrderedDict(children)
    for hooks in _HOOK_DICTS:
        if hasattr(copied, hooks):
            setattr(copied, hooks, OrderedDict())
    return copied


def _refuse_own_state(module: nn.Module) -> None:
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        raise UnsupportedModuleError(f"fused tangent: container {type(module).__name__} holds parameters or "
                                     "buffers of its own, used outside any layer; use method.tangent=autodiff")


def _dual_tree(name: str, module: nn.Module, deltas: nn.ParameterDict, key_of: dict[str, str],
               plain_input: bool) -> nn.Module:
    rule = container_rule(module)
    if rule is not None and (rule.plain_child is not None or not plain_input):
        children = {child: _dual_tree(f"{name}.{child}" if name else child, m, deltas, key_of,
                                      plain_input and child == rule.plain_child)
                    for child, m in module.named_children()}
        return rule(module, deltas, _own_keys(name, module, key_of), children)
    if next(module.children(), None) is None:
        if plain_input and not isinstance(module, (nn.Conv2d, nn.Linear)):
            return nn.Sequential(StackZeroTangent(), _dual_leaf(name, module, deltas, key_of, False))
        return _dual_leaf(name, module, deltas, key_of, plain_input)
    if plain_input:
        return nn.Sequential(StackZeroTangent(), _dual_tree(name, module, deltas, key_of, False))
    _refuse_own_state(module)
    return copy_container(module, {child: _dual_tree(f"{name}.{child}" if name else child, m, deltas, key_of, False)
                                   for child, m in module.named_children()})


def build_dual(net: nn.Module, blocks: list[str], deltas: nn.ParameterDict, key_of: dict[str, str]) -> nn.Module:
    """The dual copy of ``net`` from the first of ``blocks`` (top-level children, in forward order) on.

    Children before it (the frozen prefix) become ``nn.Identity``: the result maps the prefix's *output* (a plain
    batch) to the stacked ``[f(x; w0); J(x; w0)·δ]``. ``key_of`` maps a parameter name of ``net`` to its key in
    ``deltas``. Raises :class:`UnsupportedModuleError` for a module without a rule.
    """
    children = [n for n, _ in net.named_children()]
    first = children.index(blocks[0])
    if container_rule(net) is not None:  # a root with a rule (torchvision's ViT) splits off no prefix
        if first:
            raise UnsupportedModuleError(f"fused tangent: {type(net).__name__} with a frozen prefix")
        return _dual_tree("", net, deltas, key_of, plain_input=True)
    _refuse_own_state(net)
    return copy_container(net, {child: nn.Identity() if index < first else
                                _dual_tree(child, m, deltas, key_of, plain_input=index == first)
                                for index, (child, m) in enumerate(net.named_children())})
