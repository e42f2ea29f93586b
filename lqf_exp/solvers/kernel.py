"""solver=kernel: the exact optimum in closed form through the dual (empirical NTK) system.

One pass gathers the per-sample Jacobians ``J_n`` (``C × P`` each) and the residuals ``α·onehot − f(x_n; w0)``; then
``(JJᵀ + Nλ/2·I) u = r`` is solved in float64 and ``δ* = Jᵀu`` (:class:`~lqf_exp.solvers.dual.DualSystem`). Exact, and
cheap while ``N·C`` is small — few shots, the head alone (``method.linearize=head``), a last block — but the
Jacobian takes ``N·C·P`` numbers and the kernel ``(NC)²``, so it refuses problems above ``max_rows`` rows or
``max_memory_gb``. It needs a loss of constant curvature (MSE) and one process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lqf_exp.delta_layout import copy_flat_, flat_size
from lqf_exp.solvers.base import Solver
from lqf_exp.solvers.dual import DualSystem
from lqf_exp.solvers.objective import Evaluation, LQFObjective

__all__ = ["KernelSolver", "check_kernel_size"]


def check_kernel_size(rows: int, params: int, max_rows: int, max_memory_gb: float, what: str) -> None:
    """Raise a ValueError naming the sizes when ``rows × params`` Jacobian entries or ``rows²`` do not fit."""
    gigabytes = 8 * (rows * params + rows * rows) / 2**30
    if rows > max_rows or gigabytes > max_memory_gb:
        raise ValueError(
            f"{what}: the dual system has N·C = {rows} rows and δ has {params} entries, i.e. {gigabytes:.1f} GB in "
            f"float64, above the limits max_rows={max_rows}, max_memory_gb={max_memory_gb}. Use solver=cg or "
            "solver=adaptive, fewer shots or method.linearize=head/<a later block>, or raise the limits"
        )


class KernelSolver(Solver):
    """The closed form (see the module docstring); ``max_rows`` and ``max_memory_gb`` bound the dual system."""

    name = "kernel"
    exact = True
    needs_constant_curvature = True

    def __init__(self, max_rows: int = 6000, max_memory_gb: float = 4.0) -> None:
        super().__init__()
        if int(max_rows) < 1 or not max_memory_gb > 0:
            raise ValueError(f"solver.max_rows must be >= 1 and max_memory_gb > 0, got {max_rows}, {max_memory_gb}")
        self.max_rows, self.max_memory_gb = int(max_rows), float(max_memory_gb)
        self.system: DualSystem | None = None
        self._jacobians: list[Tensor] = []
        self._residuals: list[Tensor] = []
        self.solved = False

    def settings(self) -> dict[str, Any]:
        return {"solver": self.name, "max_rows": self.max_rows, "max_memory_gb": self.max_memory_gb}

    def bind(self, objective: LQFObjective, train_size: int, world_size: int = 1) -> None:
        super().bind(objective, train_size, world_size)
        if world_size > 1:
            raise ValueError("solver=kernel runs in one process (its system is small by construction); "
                             "use trainer.devices=1, or solver=cg/adaptive for data parallelism")
        classes = objective.net.net.get_submodule(objective.net.head_name).out_features
        check_kernel_size(train_size * classes, flat_size(objective.deltas), self.max_rows, self.max_memory_gb,
                          "solver=kernel")

    def use_dual_system(self, system: DualSystem) -> None:
        """Reuse the dual system the λ selection built; skips the Jacobian pass."""
        self.system = system

    @property
    def converged(self) -> bool:
        return self.solved

    def restart(self) -> None:
        self.solved = False

    def begin_epoch(self) -> None:
        self._jacobians, self._residuals = [], []

    def step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        if self.system is None:
            objective = self.bound
            with torch.no_grad():
                base = objective.net.apply_to_base(x)
            self._residuals.append((objective.loss.targets(y, base.shape[1], torch.float64) - base.double()).cpu())
            self._jacobians.append(objective.net.jacobian(x).double().cpu())
        return {}

    def end_epoch(self) -> Evaluation:
        objective = self.bound
        if self.system is None:
            self.system = DualSystem(torch.cat(self._jacobians), torch.cat(self._residuals))
            self._jacobians, self._residuals = [], []
        delta, u = self.system.solve(objective.weight_decay)
        copy_flat_(delta, objective.deltas)
        self.solved = True
        return Evaluation(self.system.objective(objective.weight_decay, u))
