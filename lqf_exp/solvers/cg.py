"""solver=cg: full-batch preconditioned conjugate gradient on the exact LQF quadratic.

``ConjugateGradient`` is the iteration itself on lists of tensors (float64 vectors and reductions), advanced one
matrix-vector product at a time so that a Lightning pass over the data can compute that product;
:func:`conjugate_gradient` runs it to a tolerance with a matvec function (influence, benchmarks). ``CGSolver``
drives it with one pass per iteration: the first pass computes ``∇L(δ₀)``, every later pass one ``H p``. It needs a
loss of constant curvature (an exact quadratic); the preconditioner must stay fixed during a solve (K-FAC of LQF
with MSE is). Along the iterates ``∇L(δ) = −r`` and ``L(δ) = L(δ₀) + ½ g₀ᵀe − ½ rᵀe`` (``e = δ − δ₀``) come for
free. On a Jacobian cache (``objective.in_memory``) a "pass" is one product with the stored J and no batch is read.
Every direction and its product is kept (:class:`~lqf_exp.solvers.deflation.KrylovSpace`), and each later solve (the
next λ of a path) is preconditioned two-level by them and, on the cache, by a sketch of the stiff subspace of P·H.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lqf_exp.delta_layout import flat_size, flatten, unflatten
from lqf_exp.solvers.base import Solver
from lqf_exp.solvers.deflation import Deflation, KrylovSpace, sketch_dominant_subspace
from lqf_exp.solvers.objective import Evaluation, Vectors, axpy, dot, zeros_like

log = logging.getLogger(__name__)

__all__ = ["CGSolver", "ConjugateGradient", "conjugate_gradient"]

MatVec = Callable[[Vectors], Vectors]


class ConjugateGradient:
    """Preconditioned CG for ``H x = b`` from ``x = 0``: :meth:`direction`, then ``H p``, then :meth:`advance`."""

    def __init__(self, rhs: Vectors, precondition: MatVec) -> None:
        self.precondition = precondition
        self.rhs_norm = math.sqrt(dot(rhs, rhs))
        self.x = zeros_like(rhs, torch.float64)
        self.r = [t.double().clone() for t in rhs]
        self.z = [t.double() for t in precondition(self.r)]
        self.p = [t.clone() for t in self.z]
        self.rz = dot(self.r, self.z)
        self.iterations = 0

    @property
    def residual_norm(self) -> float:
        return math.sqrt(dot(self.r, self.r))

    @property
    def relative_residual(self) -> float:
        return self.residual_norm / self.rhs_norm if self.rhs_norm > 0 else 0.0

    def direction(self) -> Vectors:
        return self.p

    def advance(self, hp: Vectors) -> None:
        curvature = dot(self.p, hp)
        if not curvature > 0:
            raise ArithmeticError(f"CG met a direction of non-positive curvature pᵀHp = {curvature}")
        alpha = self.rz / curvature
        self.x = axpy(alpha, self.p, self.x)
        self.r = axpy(-alpha, [t.double() for t in hp], self.r)
        self.z = [t.double() for t in self.precondition(self.r)]
        rz = dot(self.r, self.z)
        self.p = axpy(rz / self.rz, self.p, self.z)
        self.rz = rz
        self.iterations += 1

    def state_dict(self) -> dict[str, Any]:
        cpu = lambda vs: [t.detach().cpu() for t in vs]  # noqa: E731
        return {"x": cpu(self.x), "r": cpu(self.r), "z": cpu(self.z), "p": cpu(self.p), "rz": self.rz,
                "rhs_norm": self.rhs_norm, "iterations": self.iterations}

    @classmethod
    def from_state(cls, state: dict[str, Any], precondition: MatVec, device: torch.device) -> ConjugateGradient:
        cg = cls.__new__(cls)
        cg.precondition = precondition
        for key in ("x", "r", "z", "p"):
            setattr(cg, key, [t.to(device) for t in state[key]])
        cg.rz, cg.rhs_norm, cg.iterations = float(state["rz"]), float(state["rhs_norm"]), int(state["iterations"])
        return cg


def conjugate_gradient(matvec: MatVec, rhs: Vectors, precondition: MatVec | None = None, tol: float = 1e-10,
                       max_iter: int = 1000) -> tuple[Vectors, ConjugateGradient]:
    """Solve ``H x = rhs`` (``H`` SPD via ``matvec``) to ``‖r‖ ≤ tol·‖rhs‖``; returns ``x`` (float64) and the state."""
    cg = ConjugateGradient(rhs, precondition or (lambda v: [t.clone() for t in v]))
    while cg.relative_residual > tol and cg.iterations < max_iter:
        cg.advance(matvec(cg.direction()))
    return cg.x, cg


class CGSolver(Solver):
    """One CG iteration per pass over the training data (see the module docstring).

    Args:
        tol: stop when ``‖∇L(δ)‖ ≤ tol·‖∇L(δ₀)‖`` (the CG residual).
        recycle_gb: keep the search directions and their curvature products, up to this size, and deflate every
            later solve (another λ of the path) by them (:mod:`lqf_exp.solvers.deflation`); 0 turns it off.
        sketch_rank: on the Jacobian cache, first sketch this many dominant directions of ``P·H_d`` and deflate
            every solve by them (``sketch_iterations`` subspace iterations; block products cost no network pass
            there). 0: off. Without the cache the sketch would cost ~``rank·(iterations+1)/3`` passes: not done.
        krylov_space: share a space with another solver (the adaptive solver's CG phase) instead.
    """

    name = "cg"
    needs_constant_curvature = True
    uses_jacobian_cache = True

    def __init__(self, tol: float = 1e-6, recycle_gb: float = 1.0, sketch_rank: int = 128, sketch_iterations: int = 1,
                 krylov_space: KrylovSpace | None = None) -> None:
        super().__init__()
        if not tol > 0:
            raise ValueError(f"solver.tol must be > 0, got {tol}")
        if int(sketch_rank) < 0 or int(sketch_iterations) < 1:
            raise ValueError(f"solver.sketch_rank must be >= 0 and sketch_iterations >= 1, got {sketch_rank}, "
                             f"{sketch_iterations}")
        self.tol = float(tol)
        self.sketch_rank, self.sketch_iterations = int(sketch_rank), int(sketch_iterations)
        self.krylov_space = krylov_space if krylov_space is not None else KrylovSpace(recycle_gb)
        self.deflation: Deflation | None = None  # of the current solve (its preconditioner must not change)
        self.cg: ConjugateGradient | None = None
        self.start: Vectors | None = None
        self.start_objective = 0.0
        self.start_gradient: Vectors | None = None
        self._acc: Vectors | None = None
        self._loss_sum = 0.0
        self._count = 0
        self._state: dict[str, Any] | None = None

    def _sketch(self) -> None:
        """Seed the Krylov space with the dominant subspace of ``P·H_d`` (once, on the Jacobian cache)."""
        objective = self.bound
        space = self.krylov_space
        if not (objective.in_memory and self.sketch_rank > 0 and not space.sketched):
            return
        started = time.perf_counter()
        basis, products = sketch_dominant_subspace(objective.data_hvp_block, objective.precondition_block,
                                                   flat_size(objective.deltas), self.sketch_rank,
                                                   self.sketch_iterations)
        space.add_block(basis, products, torch.finfo(objective.deltas[0].dtype).eps)
        space.sketched = True
        log.info("sketched %d dominant directions of P·H in %.1f s", basis.shape[1], time.perf_counter() - started)

    def _preconditioner(self) -> MatVec:
        """The objective's preconditioner, made two-level by the directions earlier solves left (none at first)."""
        objective = self.bound
        self._sketch()
        self.deflation = self.krylov_space.deflation(objective.weight_decay)
        if self.deflation is None:
            return objective.precondition
        return self.deflation.preconditioner(objective.precondition)

    def settings(self) -> dict[str, Any]:
        return {"solver": self.name, "tol": self.tol, "recycle_gb": self.krylov_space.max_bytes / 2**30,
                "sketch_rank": self.sketch_rank, "preconditioned": self.bound.preconditioner is not None}

    def restart(self) -> None:
        self.cg, self.start, self._state = None, None, None

    @property
    def converged(self) -> bool:
        return self.cg is not None and self.cg.relative_residual <= self.tol

    def begin_epoch(self) -> None:
        objective = self.bound
        if self.cg is None and self._state is not None:  # resumed: rebuild the iteration from the checkpoint
            device = objective.deltas[0].device
            self.cg = ConjugateGradient.from_state(self._state["cg"], self._preconditioner(), device)
            self.start = [t.to(device) for t in self._state["start"]]
            self.start_gradient = [t.to(device) for t in self._state["start_gradient"]]
            self.start_objective = float(self._state["start_objective"])
            self._state = None
        self._acc, self._loss_sum, self._count = zeros_like(objective.deltas, torch.float64), 0.0, 0

    def step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        objective = self.bound
        assert self._acc is not None
        if objective.in_memory:  # the products come from the Jacobian cache at the end of the pass
            return {}
        if self.cg is None:  # first pass: the gradient at δ₀
            grads, losses = objective.data_gradient(x, y)
            self._loss_sum += float(losses.double().sum())
        else:
            grads, _ = objective.data_hvp([(x, y)], self.cg.direction())
        for acc, g in zip(self._acc, grads, strict=True):
            acc.add_(g)
        self._count += len(y)
        return {}

    def _reduced(self) -> tuple[Vectors, float, float]:
        objective = self.bound
        assert self._acc is not None
        device = objective.deltas[0].device
        n = float(objective.reduce_sum(torch.tensor(float(self._count), dtype=torch.float64, device=device)))
        flat = objective.reduce_sum(flatten(self._acc)) / n
        out = unflatten(flat, self._acc)
        loss = float(objective.reduce_sum(torch.tensor(self._loss_sum, dtype=torch.float64, device=device))) / n
        return out, n, loss

    def end_epoch(self) -> Evaluation:
        objective = self.bound
        if self.cg is None:
            self.start = [d.detach().double().clone() for d in objective.deltas]
            if objective.in_memory:
                start = objective.evaluate((), gradient=True)
                assert start.gradient is not None
                self.start_gradient, self.start_objective = start.gradient, start.objective
            else:
                data, _, loss = self._reduced()
                self.start_gradient = axpy(objective.weight_decay, self.start, data)
                self.start_objective = loss + objective.penalty(self.start)
            self.cg = ConjugateGradient([-g for g in self.start_gradient], self._preconditioner())
        else:
            if objective.in_memory:
                hp = objective.hvp((), self.cg.direction())
            else:
                hp = axpy(objective.weight_decay, self.cg.direction(), self._reduced()[0])
            self.krylov_space.add(flatten(self.cg.direction()), flatten(hp), objective.weight_decay,
                                  torch.finfo(objective.deltas[0].dtype).eps)
            if not self.converged:
                self.cg.advance(hp)
        assert self.start is not None and self.start_gradient is not None
        with torch.no_grad():
            for delta, s, e in zip(objective.deltas, self.start, self.cg.x, strict=True):
                delta.copy_((s + e).to(delta.dtype))
        gradient = [-r for r in self.cg.r]
        value = self.start_objective + 0.5 * dot(self.start_gradient, self.cg.x) + 0.5 * dot(gradient, self.cg.x)
        return Evaluation(value, gradient)

    def state_dict(self) -> dict[str, Any]:
        if self.cg is None or self.deflation is not None:
            # A deflated solve's preconditioner depends on the recycled space, which checkpoints do not hold (its
            # size); a resumed run restarts CG from the saved δ instead of going on with another preconditioner.
            return {"cg": None}
        assert self.start is not None and self.start_gradient is not None
        return {"cg": self.cg.state_dict(), "start": [t.cpu() for t in self.start],
                "start_gradient": [t.cpu() for t in self.start_gradient], "start_objective": self.start_objective}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cg = None
        self._state = state if state.get("cg") is not None else None
