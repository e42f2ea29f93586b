"""solver=adaptive: preconditioned direction, step size and momentum from the exact quadratic model of the batch.

Each step takes the gradient ``g`` of the objective ``L_B`` on a group of mini-batches B, the direction ``Δ = −P g``
(``P`` from the ``precond`` group, the identity with ``precond=none``) and the previous update ``v``, and moves by
``u = a Δ + m v`` with ``(a, m)`` minimizing ``M(u) = gᵀu + ½ uᵀ(H_B + η I)u`` — Martens & Grosse (2015) §7,
kfac-jax's adaptive learning rate and momentum. ``H_B`` is the exact curvature of ``L_B`` (the loss Hessian through
``J_B``, plus λ), so two forward-mode products ``J_B Δ`` and ``J_B v`` give the 2×2 system; for the MSE loss ``M``
*is* ``L_B(δ + u) − L_B(δ)``. The model damping ``η`` (relative to the curvature along ``Δ``) follows the
Levenberg–Marquardt rule on the ratio ``ρ`` of the actual to the predicted decrease (with MSE ``ρ = 1``: η stays at
its floor). No learning rate.

A step that exactly minimizes one batch's objective overfits that batch: where the problem does not interpolate the
iterates stall at a noise floor. So a step spans ``group`` loader batches, and ``group`` doubles (up to
``max_group``) after every pass that lowered the full objective by less than ``grow_below`` of the decrease so far:
the noise falls with the group size and, once a group is the whole epoch, the steps are exact full-batch steps.
For a quadratic (a loss of constant curvature) the exact minimization over ``span{Δ, v}`` of a full batch *is*
preconditioned conjugate gradient, which needs one curvature product per pass instead of a gradient and two
forward-mode products: from then on the solver hands over to :class:`~lqf_exp.solvers.cg.CGSolver` with the same
preconditioner (``conjugate_gradient``). The momentum restarts whenever the group grows, since a direction from
noisier steps would spoil the conjugacy.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lqf_exp.solvers.base import Solver
from lqf_exp.solvers.cg import CGSolver
from lqf_exp.solvers.deflation import KrylovSpace
from lqf_exp.solvers.objective import Batch, Evaluation, LQFObjective, Vectors, axpy, dot
from lqf_exp.solvers.stopping import DivergenceError

__all__ = ["AdaptiveSolver", "solve_step_coefficients"]


def solve_step_coefficients(gram: Tensor, linear: Tensor) -> Tensor:
    """Minimize ``cᵀ linear + ½ cᵀ gram c``; directions that are (numerically) dependent are dropped."""
    k = gram.shape[0]
    coef = torch.zeros(k, dtype=torch.float64)
    keep = [i for i in range(k) if gram[i, i] > 0]
    while keep:
        sub = gram[keep][:, keep]
        if torch.linalg.cond(sub) < 1e12:
            coef[keep] = torch.linalg.solve(sub, -linear[keep])
            return coef
        keep = keep[:-1]  # drop the momentum direction first
    return coef


class AdaptiveSolver(Solver):
    """The default LQF solver; see the module docstring.

    Args:
        momentum: also optimize the coefficient of the previous update (else ``u = a Δ``).
        damping: initial model damping η relative to the curvature ``ΔᵀH_BΔ/‖Δ‖²`` along the direction.
        min_damping, max_damping: bounds of η.
        adapt_damping: apply the Levenberg–Marquardt rule (η × ``decay`` when ρ > 3/4, ÷ ``decay`` when ρ < 1/4).
        decay: the factor of that rule, in (0, 1).
        grow_below: double the step group after a pass whose progress ratio is below this (0 disables growth).
        max_group: the largest number of loader batches in one step (their inputs are held until the step).
        conjugate_gradient: hand over to preconditioned CG once the steps are full-batch and the loss quadratic.
        cg_tol: that phase's tolerance on ``‖∇L‖/‖∇L(handover)‖``.
        recycle_gb: memory for the CG phases' directions, which deflate later solves of a λ path
            (:mod:`lqf_exp.solvers.deflation`); 0 turns recycling off.
        sketch_rank, sketch_iterations: the CG phase's sketch of the dominant subspace on the Jacobian cache
            (:class:`~lqf_exp.solvers.cg.CGSolver`).
    """

    name = "adaptive"
    uses_jacobian_cache = True

    def __init__(
        self,
        momentum: bool = True,
        damping: float = 1e-3,
        min_damping: float = 1e-8,
        max_damping: float = 1e4,
        adapt_damping: bool = True,
        decay: float = 0.9,
        grow_below: float = 0.05,
        max_group: int = 64,
        conjugate_gradient: bool = True,
        cg_tol: float = 1e-6,
        recycle_gb: float = 1.0,
        sketch_rank: int = 128,
        sketch_iterations: int = 1,
    ) -> None:
        super().__init__()
        if not (0 <= min_damping <= damping <= max_damping):
            raise ValueError(f"solver damping must satisfy 0 <= min_damping <= damping <= max_damping, got "
                             f"{min_damping}, {damping}, {max_damping}")
        if not 0 < decay < 1:
            raise ValueError(f"solver.decay must be in (0, 1), got {decay}")
        if not 0 <= grow_below < 1 or int(max_group) < 1:
            raise ValueError(f"solver.grow_below must be in [0, 1) and max_group >= 1, got {grow_below}, {max_group}")
        self.momentum, self.adapt_damping = bool(momentum), bool(adapt_damping)
        self.initial_damping, self.min_damping = float(damping), float(min_damping)
        self.max_damping = float(max_damping)
        self.decay, self.grow_below, self.max_group = float(decay), float(grow_below), int(max_group)
        self.conjugate_gradient, self.cg_tol = bool(conjugate_gradient), float(cg_tol)
        self.cg: CGSolver | None = None  # the full-batch phase of a quadratic
        # The CG phases' directions, kept across λs of a path to deflate the later solves.
        self.krylov_space = KrylovSpace(recycle_gb)
        self.sketch = (int(sketch_rank), int(sketch_iterations))
        self.damping = self.initial_damping
        self.group = 1
        self.previous: Vectors | None = None
        self.steps = 0
        self.epoch_batches = 0  # loader batches in the last pass
        self._exact_passes = 0  # passes in a row whose steps were full-batch (or at max_group)
        self._held: list[Batch] = []
        self._seen = 0

    def settings(self) -> dict[str, Any]:
        return {"solver": self.name, "momentum": self.momentum, "damping": self.initial_damping,
                "adapt_damping": self.adapt_damping, "grow_below": self.grow_below, "max_group": self.max_group,
                "conjugate_gradient": self.conjugate_gradient, "sketch_rank": self.sketch[0],
                "preconditioned": self.bound.preconditioner is not None}

    def bind(self, objective: LQFObjective, train_size: int, world_size: int = 1) -> None:
        super().bind(objective, train_size, world_size)
        if self.cg is not None:
            self.cg.bind(objective, train_size, world_size)

    @property
    def converged(self) -> bool:
        return self.cg is not None and self.cg.converged

    def restart(self) -> None:
        # A warm start (another λ of a path) is past the phase where small noisy steps help: full-batch steps.
        self.previous, self.damping, self.cg = None, self.initial_damping, None
        self.group, self._exact_passes = self.max_group, 0

    def observe(self, progress: float) -> None:
        if self.cg is None and progress < self.grow_below and self.group < self.max_group:
            self.group = min(2 * self.group, self.max_group)
            self._exact_passes = 0
            # A momentum direction from noisier steps spoils the conjugacy the exact 2-D steps build up: restart.
            self.previous = None

    @property
    def settled(self) -> bool:
        """Progress is no longer limited by sampling noise: the CG phase has taken two iterations, or (no CG phase)
        the steps have been full-batch, or at the largest group, for two passes."""
        if self.cg is not None:
            return self.cg.cg is not None and self.cg.cg.iterations >= 2
        return self._exact_passes >= 2

    def begin_epoch(self) -> None:
        self._held, self._seen = [], 0
        # Full-batch steps: the group covers the epoch, it has reached max_group (growing it further only trades
        # memory for the same exact steps CG takes: a fixed cap would leave a large data set stochastic for ever),
        # or the objective's products come from the Jacobian cache (a full batch costs no network pass).
        full_batch = self.bound.in_memory or 0 < self.epoch_batches <= self.group or self.group >= self.max_group
        if self.cg is None and full_batch and self.conjugate_gradient and self.bound.loss.constant_curvature:
            self.cg = CGSolver(tol=self.cg_tol, sketch_rank=self.sketch[0], sketch_iterations=self.sketch[1],
                               krylov_space=self.krylov_space)
            self.cg.bind(self.bound, self.train_size)
        if self.cg is not None:
            self.cg.begin_epoch()

    def step(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        if self.cg is not None:
            return self.cg.step(x, y)
        self._seen += 1
        self._held.append((x, y))
        if len(self._held) < self.group:
            return {}
        return self._step_on_held()

    def end_epoch(self) -> Evaluation | None:
        if self.cg is not None:
            return self.cg.end_epoch()
        self.epoch_batches = self._seen
        exact = self.group >= self.max_group or self._seen <= self.group
        self._exact_passes = self._exact_passes + 1 if exact else 0
        if self._held:  # the tail of the epoch: a shorter group
            self._step_on_held()
        return None

    def _step_on_held(self) -> dict[str, Any]:
        batches, self._held = self._held, []
        objective = self.bound
        value, grad, outputs = objective.batch_gradient(batches)
        if not math.isfinite(value):
            raise DivergenceError(f"the mini-batch objective became {value} at step {self.steps} ({self.settings()})")
        direction = [-t for t in objective.precondition(grad)]
        directions: list[Vectors] = [direction]
        if self.previous is not None and self.previous[0].device != direction[0].device:
            self.previous = [t.to(direction[0].device) for t in self.previous]
        if self.momentum and self.previous is not None:
            directions.append(self.previous)
        jvps = [[objective.jvp(x, d) for x, _ in batches] for d in directions]
        gram = objective.curvature_gram(batches, outputs, directions, jvps)
        linear = torch.tensor([dot(grad, d) for d in directions], dtype=torch.float64)
        curvature = float(gram[0, 0]) / max(dot(direction, direction), 1e-300)
        norms = torch.tensor([dot(d, d) for d in directions], dtype=torch.float64)
        coef = solve_step_coefficients(gram + self.damping * curvature * torch.diag(norms), linear)
        predicted = float(coef @ linear + 0.5 * coef @ gram @ coef)  # undamped model: L_B(δ+u) − L_B(δ) for MSE
        update = [torch.zeros_like(t) for t in direction]
        jvp_update = [torch.zeros_like(j) for j in jvps[0]]
        for c, d, js in zip(coef.tolist(), directions, jvps, strict=True):
            update = axpy(c, d, update)
            jvp_update = [a + c * j for a, j in zip(jvp_update, js, strict=True)]
        rho = 1.0
        if self.adapt_damping and predicted < 0:
            rho = (objective.objective_along(batches, outputs, update, jvp_update) - value) / predicted
            if rho > 0.75:
                self.damping = max(self.min_damping, self.damping * self.decay)
            elif rho < 0.25:
                self.damping = min(self.max_damping, self.damping / self.decay)
        with torch.no_grad():
            for delta, u in zip(objective.deltas, update, strict=True):
                delta.add_(u.to(delta.dtype))
        self.previous = [u.to(d.dtype) for u, d in zip(update, objective.deltas, strict=True)]
        self.steps += 1
        return {"loss": value, "step_size": float(coef[0]), "momentum": float(coef[1]) if len(coef) > 1 else 0.0,
                "rho": rho, "damping": self.damping, "group": float(self.group)}

    def state_dict(self) -> dict[str, Any]:
        previous = None if self.previous is None else [t.detach().cpu() for t in self.previous]
        return {"previous": previous, "damping": self.damping, "steps": self.steps, "group": self.group,
                "epoch_batches": self.epoch_batches, "exact_passes": self._exact_passes,
                "cg": None if self.cg is None else self.cg.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous = state["previous"]  # moved to the δs' device at the next step
        self.damping, self.steps, self.group = float(state["damping"]), int(state["steps"]), int(state["group"])
        self.epoch_batches, self._exact_passes = int(state["epoch_batches"]), int(state["exact_passes"])
        self.cg = None
        if state["cg"] is not None:
            self.cg = CGSolver(tol=self.cg_tol, sketch_rank=self.sketch[0], sketch_iterations=self.sketch[1],
                               krylov_space=self.krylov_space)
            self.cg.load_state_dict(state["cg"])
