"""The contract between a training method and a curvature-based preconditioner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor, nn

from lqf_exp.losses import ClassificationLoss

LayerTensors = dict[str, tuple[Tensor, Tensor | None]]


class Preconditioner(Protocol):
    """What a preconditioner offers a method that steps its own parameters (an LQF solver)."""

    def precondition(self, vectors: LayerTensors) -> LayerTensors:
        """``(C + γI)⁻¹ v`` for each target layer; ``vectors`` are shaped like the layer's (weight, bias)."""
        ...

    def set_damping_offset(self, offset: float) -> None:
        """Use ``γ = damping + offset`` from now on (the method's λ changed)."""
        ...


@dataclass
class CurvatureTargets:
    """What a preconditioner needs from a method.

    ``network`` is the module whose Gauss-Newton matrix (in output space) is the curvature: the trained network
    itself for ``finetune``/``probe``; the original network at w0 for ``lqf`` (the Hessian of the LQF objective with
    MSE is the GGN of that network at w0). ``layers`` maps the name of each ``Linear``/``Conv2d`` module of
    ``network`` (as in ``network.named_modules()``) to the trainable tensors — weight, optional bias — whose
    gradients get preconditioned; for ``lqf`` these are the δ tensors of that layer, not the layer's own frozen
    parameters. ``loss`` owns the output-space curvature. ``constant`` is True when the curvature cannot change
    during training (``lqf`` with a loss of constant curvature), so factors are computed once. ``damping_offset``
    is the λ of a ``(λ/2)‖δ‖²`` term of the objective, which the damped inverse must include. ``outputs_fn``
    (optional) gives the model outputs at which a loss Hessian that depends on the outputs (cross-entropy) is
    evaluated: for ``lqf`` the linearized outputs ``f_lin(x)``, which differ from ``network(x)`` once δ ≠ 0;
    ``None`` means ``network(x)``. ``attach`` (optional) receives the preconditioner once its inverse is ready, for
    methods that apply it themselves (LQF's solvers); without it the preconditioner rewrites ``.grad`` before each
    optimizer step.
    """

    network: nn.Module
    layers: LayerTensors
    loss: ClassificationLoss
    constant: bool
    damping_offset: float = 0.0
    outputs_fn: Callable[[Tensor], Tensor] | None = field(default=None)
    attach: Callable[[Preconditioner], None] | None = field(default=None)
