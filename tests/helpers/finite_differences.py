"""Central finite differences of a network's output along a direction in some of its parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def output_moved(net: nn.Module, x: Tensor, names: Sequence[str], direction: Sequence[Tensor], step: float) -> Tensor:
    """``net(x)`` with the parameters ``names`` moved by ``step · direction``, restored afterwards."""
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, d in zip(names, direction, strict=True):
            params[name].add_(step * d)
        out = net(x)
        for name, d in zip(names, direction, strict=True):
            params[name].sub_(step * d)
    return out


def central_difference(net: nn.Module, x: Tensor, names: Sequence[str], direction: Sequence[Tensor], step: float,
                       order: int = 2) -> Tensor:
    """The directional derivative of ``net(x)``: second-order (error ~h²) or fourth-order (error ~h⁴) stencil."""
    def at(h: float) -> Tensor:
        return output_moved(net, x, names, direction, h)

    if order == 2:
        return (at(step) - at(-step)) / (2 * step)
    if order == 4:
        return (8 * (at(step) - at(-step)) - (at(2 * step) - at(-2 * step))) / (12 * step)
    raise ValueError(f"order must be 2 or 4, got {order}")
