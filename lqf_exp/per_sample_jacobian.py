"""Per-sample Jacobians ``J(x; w0)`` of a network with respect to some of its Conv2d/Linear weights, by layer hooks.

One forward pass records the input of every layer that has a δ; one backward pass per output class then gives each
layer's output gradient *per sample* (BatchNorm is in eval mode, so samples do not interact), and the per-sample
weight rows follow in closed form: ``g aᵀ`` for a Linear layer, ``g · unfold(a)ᵀ`` summed over positions for a
convolution, ``g`` (summed over positions) for a bias. That is C backward passes and one matrix product per layer,
instead of the B·C backward passes that ``vmap(jacrev)`` amounts to. Layers of another kind, grouped or
non-zero-padded convolutions, or parameters outside Conv2d/Linear (BatchNorm γ/β) are not covered:
:func:`hook_jacobian_supported` says so, and the caller uses ``torch.func`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["hook_jacobian", "hook_jacobian_supported"]


def _owner(net: nn.Module, name: str) -> tuple[str, nn.Module, str]:
    module_name, _, attribute = name.rpartition(".")
    return module_name, net.get_submodule(module_name), attribute


def _supported_layer(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def hook_jacobian_supported(net: nn.Module, names: Sequence[str]) -> bool:
    """Whether every parameter in ``names`` is the weight or bias of a layer :func:`hook_jacobian` handles."""
    return all(_supported_layer(_owner(net, n)[1]) and _owner(net, n)[2] in ("weight", "bias") for n in names)


def _patches(module: nn.Module, inputs: Tensor) -> Tensor:
    """What a layer's weight multiplies, ``[B, positions, fan-in]``: the same for every class, so formed once."""
    if isinstance(module, nn.Linear):
        return inputs.flatten(1, -2) if inputs.dim() > 2 else inputs[:, None]
    assert isinstance(module, nn.Conv2d)
    return F.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=module.padding,
                    stride=module.stride).transpose(1, 2)


def _rows(module: nn.Module, patches: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample ``(weight rows [B, *W], bias rows [B, out])`` of one layer for one output class."""
    if isinstance(module, nn.Linear):
        g = grads.flatten(1, -2) if grads.dim() > 2 else grads[:, None]  # [B, positions, out]
        return torch.bmm(g.transpose(1, 2), patches), g.sum(1)
    g = grads.flatten(2)  # [B, Cout, L]
    return torch.bmm(g, patches).view(len(g), *module.weight.shape), g.sum(2)


def hook_jacobian(net: nn.Module, names: Sequence[str], x: Tensor, start: nn.Module | None = None,
                  out: Tensor | None = None) -> Tensor:
    """``[B, C, P]``: the per-sample Jacobian of ``net(x)`` (``[B, C]``) with respect to the parameters ``names``
    (P entries in that order), at the network's current weights. ``start``: the first module whose input carries
    gradients (the first linearized block; earlier modules record no graph). ``out``: where to write the rows (a
    slice of a preallocated cache: no temporary of the batch's size)."""
    if not hook_jacobian_supported(net, names):
        raise ValueError(f"hook_jacobian covers weights and biases of Linear and plain Conv2d layers, not all of "
                         f"{list(names)}")
    layers = {_owner(net, n)[0]: _owner(net, n)[1] for n in names}
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}

    def record(name: str):  # noqa: ANN202
        def hook(_module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            inputs[name], outputs[name] = args[0].detach(), out
        return hook

    def open_graph(_module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return (args[0].detach().requires_grad_(True), *args[1:])

    handles = [module.register_forward_hook(record(name)) for name, module in layers.items()]
    entry = start if start is not None else net
    handles.append(entry.register_forward_pre_hook(open_graph))
    try:
        with torch.enable_grad():
            logits = net(x)
            classes = logits.shape[1]
            order = list(layers)
            patches = {n: _patches(layers[n], inputs[n]) for n in order}
            sizes = [p.numel() for p in (net.get_parameter(n) for n in names)]
            if out is None:
                out = torch.empty(len(x), classes, sum(sizes), dtype=logits.dtype, device=logits.device)
            for c in range(classes):
                grads = torch.autograd.grad(logits[:, c].sum(), [outputs[n] for n in order],
                                            retain_graph=c + 1 < classes)
                per_layer = {n: _rows(layers[n], patches[n], g) for n, g in zip(order, grads, strict=True)}
                offset = 0
                for name, size in zip(names, sizes, strict=True):
                    module_name, _, attribute = name.rpartition(".")
                    weight_rows, bias_rows = per_layer[module_name]
                    rows = weight_rows if attribute == "weight" else bias_rows
                    out[:, c, offset : offset + size] = rows.reshape(len(x), size)
                    offset += size
    finally:
        for handle in handles:
            handle.remove()
    return out
