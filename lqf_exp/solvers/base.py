"""What every LQF solver implements; the LQF LightningModule drives it one batch and one pass at a time."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from lqf_exp.solvers.dual import DualSystem
from lqf_exp.solvers.objective import Evaluation, LQFObjective

__all__ = ["Solver"]


class Solver:
    """Minimizes an :class:`~lqf_exp.solvers.objective.LQFObjective` over passes through the training data.

    Per pass the module calls :meth:`begin_epoch`, then :meth:`step` for every batch (this rank's share under
    data parallelism), then :meth:`end_epoch`. A mini-batch solver updates δ in :meth:`step`; a full-batch solver
    accumulates there and updates in :meth:`end_epoch`, which may return the objective (and gradient) it knows at
    the new δ — otherwise the module evaluates it with a pass of its own. ``exact`` solvers are done after one pass.
    """

    name: ClassVar[str] = "solver"
    exact: ClassVar[bool] = False
    needs_constant_curvature: ClassVar[bool] = False
    # Whether the solver can run on a Jacobian cache (full-batch products with no network pass); a mini-batch
    # solver (sgd) cannot, so the cache is not built for it.
    uses_jacobian_cache: ClassVar[bool] = False

    def __init__(self) -> None:
        self.objective: LQFObjective | None = None
        self.train_size = 0

    def bind(self, objective: LQFObjective, train_size: int, world_size: int = 1) -> None:
        """Attach the objective (a new one after λ changes); ``train_size`` is the global number of samples."""
        if self.needs_constant_curvature and not objective.loss.constant_curvature:
            raise ValueError(
                f"solver={self.name} solves a quadratic objective, but loss={objective.loss.kind} has a curvature "
                "that moves with the outputs; use solver=adaptive or solver=sgd, or loss=mse"
            )
        self.objective, self.train_size = objective, int(train_size)

    @property
    def bound(self) -> LQFObjective:
        if self.objective is None:
            raise RuntimeError(f"solver={self.name} is not bound to an objective yet")
        return self.objective

    @property
    def converged(self) -> bool:
        """True when the solver itself knows it is done (an exact solve, a residual below its tolerance)."""
        return False

    @property
    def settled(self) -> bool:
        """True when slow progress means convergence, not sampling noise: the stopping rule only ends a solve then
        (a mini-batch solver that can still enlarge its steps' batches is not settled)."""
        return True

    def settings(self) -> dict[str, Any]:
        """The solver's configuration, for messages and metrics.json."""
        return {"solver": self.name}

    def begin_epoch(self) -> None:
        """Called before the first batch of a pass."""

    def step(self, x: Tensor, y: Tensor) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def end_epoch(self) -> Evaluation | None:
        """Called after the last batch of a pass; returns the objective at the new δ if the solver knows it."""
        return None

    def observe(self, progress: float) -> None:
        """After each evaluated pass: its progress ratio ``(L_prev − L)/(L_start − L)`` (negative if L rose)."""

    def use_dual_system(self, system: DualSystem) -> None:
        """Offered the dual system when ``weight_decay=auto`` built one; a solver that needs it may keep it."""

    def restart(self) -> None:
        """Forget momentum/Krylov state (after λ changed), keeping δ as the warm start."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
