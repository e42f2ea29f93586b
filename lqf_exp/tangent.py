"""The fused tangent path of :class:`~lqf_exp.linearize.LinearizedNetwork` (``method.tangent=fused``).

Forward-mode AD runs every layer twice (primal, then tangent) plus the ``conv(x, δW)`` term. Here the primal and
tangent streams travel as ONE tensor ``z = [primal; tangent]`` stacked on the batch axis, through per-module rules:

- ``Conv2d``/``Linear``: ``conv(z, W0)`` in one call (the weights are read once for both streams), then
  ``conv(primal, δW) + δb`` is added to the tangent half. The backward pass (a custom autograd function)
  differentiates only the tangent half: ``convᵀ(g_t, W0)`` and the δW gradient, the two convolutions fine-tuning
  also does; the primal stream never depends on δ, so its gradient is never formed.
- eval ``BatchNorm``: one per-channel scale of ``z`` and a shift of the primal half only (the tangent of an affine
  map has no shift).
- ``ReLU``/``LeakyReLU``: ``z`` times the slope mask of the primal half.
- ``MaxPool2d``: the tangent is gathered at the primal's argmax.
- linear glue (residual sums, average pooling, flatten, identity, eval dropout) works on ``z`` unchanged.

A module without a rule that receives ``z`` raises a clear error; non-linearities called as functions inside a
``forward`` cannot be seen, so :class:`~lqf_exp.linearize.LinearizedNetwork` checks the first batch against
forward-mode AD. Until a module with a δ is reached, the input is the plain batch (its tangent is zero).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lqf_exp.tangent_ops import DualConv, DualLinear, autocast_inputs

__all__ = ["FusedTangent", "UnsupportedModuleError", "fused_supports"]

# Modules that are linear maps applied alike to every sample: they act on z = [primal; tangent] as they are.
_LINEAR_PASSTHROUGH = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)
_RULED = (nn.Conv2d, nn.Linear, _BatchNorm, nn.ReLU, nn.LeakyReLU, nn.MaxPool2d)


class UnsupportedModuleError(RuntimeError):
    """A module without a fused tangent rule received the stacked primal/tangent tensor."""


def _conv_args(module: nn.Conv2d) -> tuple:
    if module.padding_mode != "zeros":
        raise UnsupportedModuleError(f"fused tangent: Conv2d padding_mode={module.padding_mode!r} (only 'zeros')")
    return module.stride, module.padding, module.dilation, module.groups


def fused_supports(module: nn.Module) -> bool:
    """Whether ``module`` (a leaf) has a fused tangent rule or is linear glue that needs none (the variants the rules
    refuse — non-zero padding modes, max-pool returning indices — count as unsupported, so ``tangent=auto`` falls
    back instead of raising)."""
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return False
    if isinstance(module, nn.MaxPool2d) and module.return_indices:
        return False
    return isinstance(module, _RULED + _LINEAR_PASSTHROUGH)


class FusedTangent:
    """Runs ``net`` on ``z = [primal; tangent]`` by installing per-module rules for the duration of one call.

    Args:
        net: the network at w0 (eval mode).
        blocks: the top-level children that can see a tangent (the linearized blocks); the others run as they are.
    """

    def __init__(self, net: nn.Module, blocks: list[str]) -> None:
        self.net = net
        self.blocks = list(blocks)
        self._batch = 0
        # the leaves that can see the stacked tensor, found once (the rules are installed on every call)
        self._leaves = [(name, m) for name, m in net.named_modules()
                        if next(m.children(), None) is None and name.split(".")[0] in self.blocks]

    def __call__(self, x: Tensor, tangent_of: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(f(x; w0), J(x; w0)·v)``, the second differentiable in the tangents; ``tangent_of`` maps a parameter
        name (``layer1.0.conv1.weight``) to its tangent (δ or any direction ``v``)."""
        self._batch = x.shape[0]
        with self._rules(tangent_of):
            out = self.net(x)
        if self._is_dual(out):
            return out[: self._batch], out[self._batch :]
        return out, torch.zeros_like(out)

    def unsupported(self) -> list[str]:
        """The leaf modules of the tangent-carrying blocks that have no fused rule (and are not linear glue)."""
        return [f"{name} ({type(m).__name__})" for name, m in self._leaves if not fused_supports(m)]

    # -- rules ------------------------------------------------------------------------------------------------
    def _is_dual(self, z: Tensor) -> bool:
        return z.shape[0] == 2 * self._batch

    @contextmanager
    def _rules(self, tangent_of: Mapping[str, Tensor]) -> Iterator[None]:
        patched = []
        try:
            for name, module in self._leaves:
                rule = self._rule_for(name, module, tangent_of)
                if rule is not None:
                    module.forward = rule  # type: ignore[method-assign]  # instance attribute shadows the class's
                    patched.append(module)
            yield
        finally:
            for module in patched:
                del module.forward

    def _rule_for(self, name: str, module: nn.Module, tangent_of: Mapping[str, Tensor]) -> Callable | None:
        prefix = f"{name}." if name else ""
        dw, db = tangent_of.get(prefix + "weight"), tangent_of.get(prefix + "bias")
        if isinstance(module, nn.Conv2d):
            return partial(self._conv, module, _conv_args(module), dw, db)
        if isinstance(module, nn.Linear):
            return partial(self._linear, module, dw, db)
        if isinstance(module, _BatchNorm):
            return partial(self._batch_norm, module, dw, db)
        if isinstance(module, (nn.ReLU, nn.LeakyReLU)):
            slope = module.negative_slope if isinstance(module, nn.LeakyReLU) else 0.0
            return partial(self._activation, module, slope)
        if isinstance(module, nn.MaxPool2d):
            return partial(self._max_pool, module)
        if isinstance(module, _LINEAR_PASSTHROUGH):
            return None
        if any(p in tangent_of for p in (prefix + n for n, _ in module.named_parameters())):
            raise UnsupportedModuleError(
                f"fused tangent: module {name!r} ({type(module).__name__}) has a δ but no fused rule; "
                "use method.tangent=autodiff"
            )
        return partial(self._guard, module, name)

    def _guard(self, module: nn.Module, name: str, z: Tensor) -> Tensor:
        if self._is_dual(z):
            raise UnsupportedModuleError(
                f"fused tangent: module {name!r} ({type(module).__name__}) has no fused tangent rule and is "
                "reached by the tangent; use method.tangent=autodiff"
            )
        return type(module).forward(module, z)

    def _conv(self, module: nn.Conv2d, args: tuple, dw: Tensor | None, db: Tensor | None, z: Tensor) -> Tensor:
        dual = self._is_dual(z)
        if not dual and dw is None and db is None:
            return type(module).forward(module, z)
        return DualConv.apply(*autocast_inputs(z, dw, db, module.weight, module.bias), args, dual)

    def _linear(self, module: nn.Linear, dw: Tensor | None, db: Tensor | None, z: Tensor) -> Tensor:
        dual = self._is_dual(z)
        if not dual and dw is None and db is None:
            return type(module).forward(module, z)
        return DualLinear.apply(*autocast_inputs(z, dw, db, module.weight, module.bias), dual)

    def _batch_norm(self, module: _BatchNorm, d_gamma: Tensor | None, d_beta: Tensor | None, z: Tensor) -> Tensor:
        dual = self._is_dual(z)
        if not dual and d_gamma is None and d_beta is None:
            return type(module).forward(module, z)
        assert module.running_var is not None and module.running_mean is not None  # eval mode, tracked stats
        inv_std = torch.rsqrt(module.running_var + module.eps)
        scale = inv_std if module.weight is None else inv_std * module.weight
        shift = -module.running_mean * scale
        if module.bias is not None:
            shift = shift + module.bias
        view = (1, -1) + (1,) * (z.dim() - 2)
        if not dual:
            z = torch.cat([z, torch.zeros_like(z)])
        zv = z.view(2, self._batch, *z.shape[1:])
        shifts = torch.stack([shift, torch.zeros_like(shift)]).view((2, 1, -1) + view[2:])
        out = torch.addcmul(shifts.to(z.dtype), zv, scale.view((1,) + view).to(z.dtype)).view(z.shape)
        if d_gamma is None and d_beta is None:
            return out
        # δγ, δβ (bn_affine=linearize): the tangent gains x̂·δγ + δβ, x̂ the normalized primal.
        extra = torch.zeros((), dtype=z.dtype, device=z.device)
        if d_gamma is not None:
            normalized = (zv[0] - module.running_mean.view(view)) * inv_std.view(view)
            extra = normalized.to(z.dtype) * d_gamma.view(view).to(z.dtype)
        if d_beta is not None:
            extra = extra + d_beta.view(view).to(z.dtype)
        return torch.cat([out[: self._batch], out[self._batch :] + extra])

    def _activation(self, module: nn.Module, slope: float, z: Tensor) -> Tensor:
        if not self._is_dual(z):
            return type(module).forward(module, z)
        zv = z.view(2, self._batch, *z.shape[1:])
        # Both halves times the primal's slope mask in one kernel: the activation's own backward op, with the
        # stacked tensor as "gradient" (primal·mask = activation(primal); tangent·mask = its JVP). The mask holds no
        # gradient, hence the detached primal.
        mask_of = zv[0].detach().unsqueeze(0)
        if slope == 0.0:
            return torch.ops.aten.threshold_backward(zv, mask_of, 0.0).view(z.shape)
        return torch.ops.aten.leaky_relu_backward(zv, mask_of, slope, False).view(z.shape)

    def _max_pool(self, module: nn.MaxPool2d, z: Tensor) -> Tensor:
        if not self._is_dual(z):
            return type(module).forward(module, z)
        if module.return_indices:
            raise UnsupportedModuleError("fused tangent: MaxPool2d(return_indices=True)")
        primal, tangent = z[: self._batch], z[self._batch :]
        p_out, index = F.max_pool2d(primal, module.kernel_size, module.stride, module.padding, module.dilation,
                                    ceil_mode=module.ceil_mode, return_indices=True)
        t_out = tangent.flatten(2).gather(2, index.flatten(2)).view_as(p_out)
        return torch.cat([p_out, t_out])
