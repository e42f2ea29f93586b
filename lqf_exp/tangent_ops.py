"""The autograd functions of the fused tangent path (:mod:`lqf_exp.tangent`): a convolution or linear layer applied to
``z = [primal; tangent]`` stacked on the batch axis, whose backward pass forms only the tangent half's gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNFOLD_MAX_POSITIONS", "DualConvFunction", "DualLeaf", "DualLinearFunction", "LayerNormTangentFunction",
           "UnsupportedModuleError", "autocast_inputs", "halves"]

# On CPU, oneDNN's weight gradient is slow when a convolution has few output positions per sample (ResNet's last
# stages at small resolution: 7× a forward at 1×1, 2.6× at 2×2, on the 2-core box); there an unfold and one matrix
# product is 2-4× faster (benchmarks/README.md). At ≥ 16 positions oneDNN wins.
UNFOLD_MAX_POSITIONS = 4


def _unfold_weight_gradient(g_t: Tensor, args: tuple) -> bool:
    _, _, dilation, groups = args
    return (g_t.device.type == "cpu" and groups == 1 and g_t.shape[2] * g_t.shape[3] <= UNFOLD_MAX_POSITIONS
            and tuple(dilation) == (1, 1))


def _conv_input_gradient(g_t: Tensor, primal: Tensor, w0: Tensor, args: tuple) -> Tensor:
    stride, padding, dilation, groups = args
    return torch.ops.aten.convolution_backward(g_t, primal, w0, None, stride, padding, dilation, False, [0, 0],
                                               groups, [True, False, False])[0]


def _unfolded_weight_gradient(g_t: Tensor, primal: Tensor, shape: torch.Size, args: tuple) -> Tensor:
    stride, padding, _, _ = args
    cols = F.unfold(primal, shape[2:], padding=padding, stride=stride)  # [B, C_in·k·k, L]
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # [B·L, C_in·k·k]
    grads = g_t.flatten(2).transpose(1, 2).reshape(-1, shape[0])  # [B·L, C_out]
    return (grads.t() @ rows).view(shape)


class UnsupportedModuleError(RuntimeError):
    """A module of the linearized blocks has no fused tangent rule."""


def halves(z: Tensor) -> Tensor:
    """``z = [primal; tangent]`` viewed as ``[2, B, ...]``."""
    return z.view(2, z.shape[0] // 2, *z.shape[1:])


class DualLeaf(nn.Module):
    """A dual module: reads w0 from ``base`` and δ from ``deltas[keys[...]]`` when called (neither registered here)."""

    def __init__(self, base: nn.Module, deltas: nn.ParameterDict, keys: dict[str, str]) -> None:
        super().__init__()
        # Plain attributes, not submodules/parameters: the LinearizedNetwork owns both, so its state dict, .to()
        # and DDP see them once; functional_call(..., {"deltas.<key>": v}) swaps what these lookups return.
        self.__dict__["base"] = base
        self.__dict__["deltas"] = deltas
        self.keys = dict(keys)

    def delta(self, name: str) -> Tensor | None:
        key = self.keys.get(name)
        return None if key is None else self.deltas[key]

    def extra_repr(self) -> str:
        return f"{type(self.base).__name__}, δ={sorted(self.keys)}"


def _zeros_like(t: Tensor) -> Tensor:
    """Zeros shaped like ``t`` without writing them: ``cat`` reads the broadcast scalar."""
    return t.new_zeros(()).expand_as(t)


def autocast_inputs(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under autocast, the inputs of a fused convolution/linear cast to the autocast dtype *outside* the autograd
    function (the casts are differentiable, so δ's gradient comes back in δ's dtype): its backward runs without
    autocast and needs one dtype throughout."""
    first = tensors[0]
    assert first is not None
    device = first.device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


class DualConvFunction(torch.autograd.Function):
    """``[conv(p, W0) + b0; conv(t, W0) + conv(p, δW) + δb]`` for ``z = [p; t]``; gradients for t, δW, δb only."""

    @staticmethod
    def forward(ctx, z: Tensor, dw: Tensor | None, db: Tensor | None, w0: Tensor, b0: Tensor | None,  # type: ignore[override]
                args: tuple, dual: bool) -> Tensor:
        stride, padding, dilation, groups = args
        batch = z.shape[0] // 2 if dual else z.shape[0]
        primal = z[:batch]
        if dual:
            out = F.conv2d(z, w0, None, stride, padding, dilation, groups)
            if dw is not None:
                out[batch:] += F.conv2d(primal, dw, db, stride, padding, dilation, groups)
        else:  # the tangent of the input is zero: the tangent half is the δ term alone
            p_out = F.conv2d(primal, w0, None, stride, padding, dilation, groups)
            t_out = (F.conv2d(primal, dw, db, stride, padding, dilation, groups) if dw is not None
                     else _zeros_like(p_out))
            out = torch.cat([p_out, t_out])
        if b0 is not None:
            out[:batch] += b0.view(1, -1, 1, 1)
        ctx.args, ctx.dual, ctx.batch = args, dual, batch
        ctx.has_db = db is not None
        # a copy of the primal half: a view would keep the whole stacked input (primal and tangent) alive until the
        # backward pass, and the tangent half is not needed there
        ctx.save_for_backward(primal.clone() if dual else primal, w0, dw)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:  # type: ignore[override]
        primal, w0, dw = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.args
        g_t = grad[ctx.batch :]
        if not (g_t.is_contiguous() or g_t.is_contiguous(memory_format=torch.channels_last)):
            g_t = g_t.contiguous()  # (a batch slice of either layout is already contiguous in it)
        want_z = ctx.dual and ctx.needs_input_grad[0]
        want_dw = dw is not None and ctx.needs_input_grad[1]
        want_db = dw is not None and ctx.has_db and ctx.needs_input_grad[2]
        if want_dw and _unfold_weight_gradient(g_t, ctx.args):
            g_in = _conv_input_gradient(g_t, primal, w0, ctx.args) if want_z else None
            grad_dw = _unfolded_weight_gradient(g_t, primal, dw.shape, ctx.args)
            grad_db = g_t.sum((0, 2, 3)) if want_db else None
        else:
            # One call gives both: the input gradient needs only W0 (not the input's values), the weight gradient
            # only the input (not the weight's values), and δW has W0's shape.
            g_in, grad_dw, grad_db = torch.ops.aten.convolution_backward(
                g_t, primal, w0, [w0.shape[0]] if want_db else None, stride, padding, dilation, False, [0, 0],
                groups, [want_z, want_dw, want_db])
        grad_z = torch.cat([_zeros_like(g_in), g_in]) if want_z else None
        return grad_z, grad_dw, grad_db, None, None, None, None


class DualLinearFunction(torch.autograd.Function):
    """The ``Linear`` counterpart of :class:`DualConvFunction` (inputs ``[..., in]``), written as matrix products into
    the halves of one output: ``p·W0ᵀ + b0`` and ``t·W0ᵀ + p·δWᵀ + δb`` (BLAS accumulates the bias and the δ term,
    so no tensor is added or concatenated afterwards; in a ViT every matrix product of the step is one of these)."""

    @staticmethod
    def forward(ctx, z: Tensor, dw: Tensor | None, db: Tensor | None, w0: Tensor, b0: Tensor | None,  # type: ignore[override]
                dual: bool) -> Tensor:
        batch = z.shape[0] // 2 if dual else z.shape[0]
        primal = z[:batch]
        p2 = primal.reshape(-1, z.shape[-1])
        out = z.new_empty(2 * batch, *z.shape[1:-1], w0.shape[0])
        o_p, o_t = out.view(2, -1, w0.shape[0]).unbind(0)
        with torch.autocast(z.device.type, enabled=False):  # the inputs share one dtype (autocast_inputs); out=
            _product(o_p, p2, w0, b0)
            if dual:
                _product(o_t, z[batch:].reshape(-1, z.shape[-1]), w0, db)
                if dw is not None:
                    o_t.addmm_(p2, dw.t())
            elif dw is not None:
                _product(o_t, p2, dw, db)
            else:
                o_t.zero_()
        ctx.dual, ctx.batch, ctx.has_db = dual, batch, db is not None
        # The primal half as a view, not a copy as in DualConvFunction: in a ViT q, k and v read the same input, and
        # keeping that stacked input once costs less memory and time than three copies of its primal half.
        ctx.save_for_backward(primal, w0, dw)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:  # type: ignore[override]
        primal, w0, dw = ctx.saved_tensors
        g2 = grad[ctx.batch :].reshape(-1, grad.shape[-1])
        grad_z = grad_dw = grad_db = None
        if ctx.dual and ctx.needs_input_grad[0] and torch.is_grad_enabled():
            # create_graph=True (a curvature product differentiates this backward): out= has no autograd
            g_t = (g2 @ w0.to(g2.dtype)).reshape(ctx.batch, *primal.shape[1:])
            grad_z = torch.cat([torch.zeros_like(g_t), g_t])
        elif ctx.dual and ctx.needs_input_grad[0]:
            grad_z = g2.new_empty(2 * ctx.batch, *primal.shape[1:])
            g_p, g_t = grad_z.view(2, -1, primal.shape[-1]).unbind(0)
            g_p.zero_()
            torch.mm(g2, w0.to(g2.dtype), out=g_t)
        if dw is not None:
            p2 = primal.reshape(-1, primal.shape[-1])
            if ctx.needs_input_grad[1]:
                grad_dw = (g2.t() @ p2.to(g2.dtype)).to(dw.dtype)
            if ctx.has_db and ctx.needs_input_grad[2]:
                grad_db = g2.sum(0).to(dw.dtype)
        return grad_z, grad_dw, grad_db, None, None, None


def _product(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """``out = x·weightᵀ (+ bias)``, written in place."""
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


class LayerNormTangentFunction(torch.autograd.Function):
    """LayerNorm's input tangent ``γ⊙P(t)``, ``P(t) = (t − mean t − x̂·mean(x̂ t))/σ`` at the primal ``x``.

    ``P`` is symmetric, and LayerNorm's own backward kernel computes ``P(γ⊙g)``: so the forward is that kernel
    without γ, times γ, and the backward (the adjoint) is that kernel with γ; two fused kernels instead of about ten
    element-wise operations and their backward. ``primal``, ``mean``, ``rstd``: what ``native_layer_norm`` returned
    for the primal (no gradient flows to them)."""

    @staticmethod
    def forward(ctx, tangent: Tensor, primal: Tensor, mean: Tensor, rstd: Tensor,  # type: ignore[override]
                weight: Tensor | None, shape: list[int]) -> Tensor:
        ctx.shape = shape
        ctx.save_for_backward(primal, mean, rstd, weight)
        out = torch.ops.aten.native_layer_norm_backward(tangent, primal, shape, mean, rstd, None, None,
                                                        [True, False, False])[0]
        return out if weight is None else out.mul_(weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:  # type: ignore[override]
        primal, mean, rstd, weight = ctx.saved_tensors
        grad_t = torch.ops.aten.native_layer_norm_backward(grad.contiguous(), primal, ctx.shape, mean, rstd, weight,
                                                           None, [True, False, False])[0]
        return grad_t, None, None, None, None, None
