"""The contract between a training method and a curvature-based preconditioner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn


@dataclass
class CurvatureTargets:
    """What a preconditioner needs from a method.

    ``network`` is the module whose Gauss-Newton matrix (in output space) is the curvature: the trained network
    itself for ``finetune``/``probe``; the original network at w0 for ``lqf`` (the Hessian of the LQF objective with
    MSE is the GGN of that network at w0). ``layers`` maps the name of each ``Linear``/``Conv2d`` module of
    ``network`` (as in ``network.named_modules()``) to the trainable tensors — weight, optional bias — whose
    gradients get preconditioned; for ``lqf`` these are the δ tensors of that layer, not the layer's own frozen
    parameters. ``constant`` is True when the curvature cannot change during training (``lqf`` with MSE), so
    factors are computed once. ``outputs_fn`` (optional) gives the model outputs at which a loss Hessian that
    depends on the outputs (cross-entropy) is evaluated: for ``lqf`` the linearized outputs ``f_lin(x)``, which
    differ from ``network(x)`` once δ ≠ 0; ``None`` means ``network(x)``.
    """

    network: nn.Module
    layers: dict[str, tuple[Tensor, Tensor | None]]
    constant: bool
    outputs_fn: Callable[[Tensor], Tensor] | None = field(default=None)
