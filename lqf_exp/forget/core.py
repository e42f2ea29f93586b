"""The edited solution of an LQF problem once samples are removed: the problem, and three ways to its optimum.

The problem after removing a set S of the N training samples is the run's own objective on what remains, with
the same λ and the mean over the N' = N − |S| remaining samples (what ``python run.py ... data.drop=<S>
method.weight_decay=<λ>`` solves):

    L'(δ) = (1/N') Σ_{n∉S} ‖r_n − J_n δ‖² + (λ/2)‖δ‖²,   in sum form  Σ_{n∉S} ‖r_n − J_n δ‖² + (N'λ/2)‖δ‖².

The penalty weight is μ' = N'λ/2, not the run's μ = Nλ/2 that leave-one-out influence keeps
(:mod:`lqf_exp.influence.core`): removing 10% changes it by 10%, so the influence directions are not the answer
here. J, r are taken at the run's w0 (its head included) unless the head is refitted first.

- :func:`exact_solution`: the dual system of the remaining rows, ``δ' = J_kᵀ(J_kJ_kᵀ + μ'I)⁻¹ r_k``, one Cholesky
  solve in float64 (:class:`~lqf_exp.solvers.dual.DualSystem`, whose μ is N'λ/2 because it holds N' samples).
- :func:`conjugate_gradient_from`: preconditioned CG on L' from a starting δ — the run's δ* (``solve``: the removal
  is a small change of a solved problem, so few iterations remain) or zero (``retrain``: the reference). The
  preconditioner is the run's K-FAC inverse (estimated with S: it only preconditions, the answer is the optimum of
  L' whatever it is), made two-level by a sketch of the stiff subspace of P·H when J is cached.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from lqf_exp.delta_layout import copy_flat_, flat_size, flatten
from lqf_exp.solvers import ConjugateGradient, DualSystem, LQFObjective
from lqf_exp.solvers.deflation import KrylovSpace, sketch_dominant_subspace
from lqf_exp.solvers.objective import Vectors, norm

log = logging.getLogger(__name__)

__all__ = ["Solution", "conjugate_gradient_from", "exact_solution", "gradient_norm"]

Batches = Callable[[], Iterable[tuple[Tensor, Tensor]]]


@dataclass
class Solution:
    """An edited δ (flat, float64) and how it was reached.

    Attributes:
        delta: ``[P]`` float64.
        iterations: CG iterations (0 for the closed form).
        converged: the tolerance was met (the closed form always is).
        seconds: wall time of the solve alone (Jacobians, sketch and iterations; not loading or evaluation).
        sketch: directions deflated (0: none).
    """

    delta: Tensor
    iterations: int
    converged: bool
    seconds: float
    sketch: int = 0


def exact_solution(system: DualSystem, weight_decay: float) -> Solution:
    """The optimum of the problem ``system`` holds (its N samples, penalty Nλ/2), by the dual system's closed form."""
    started = time.perf_counter()
    delta, _ = system.solve(weight_decay)
    return Solution(delta, 0, True, time.perf_counter() - started)


def gradient_norm(objective: LQFObjective, batches: Batches, delta: Tensor) -> float:
    """``‖∇L'(δ)‖`` at a flat δ (written into the objective's δ tensors)."""
    copy_flat_(delta, objective.deltas)
    evaluation = objective.evaluate(batches(), gradient=True)
    assert evaluation.grad_norm is not None
    return evaluation.grad_norm


def _preconditioner(objective: LQFObjective, sketch_rank: int) -> tuple[Callable[[Vectors], Vectors], int]:
    """The objective's preconditioner (K-FAC, or none), deflated by a rank-``sketch_rank`` sketch of the dominant
    subspace of P·H when J is cached (block products are cheap only there; the run's own CG space is not saved in its
    checkpoint, so this is the reusable form of it)."""
    if sketch_rank <= 0 or not objective.in_memory:
        return objective.precondition, 0
    basis, products = sketch_dominant_subspace(objective.data_hvp_block, objective.precondition_block,
                                               flat_size(objective.deltas), sketch_rank, iterations=1)
    space = KrylovSpace(max_gb=2 * basis.numel() * 8 / 2**30 + 1e-3)
    space.add_block(basis, products, torch.finfo(objective.deltas[0].dtype).eps)
    deflation = space.deflation(objective.weight_decay)
    assert deflation is not None
    return deflation.preconditioner(objective.precondition), deflation.size


def conjugate_gradient_from(objective: LQFObjective, batches: Batches, start: Tensor, max_iter: int,
                            tol: float | None = None, error: float | None = None, sketch_rank: int = 0) -> Solution:
    """Minimize ``objective`` from the flat ``start`` by preconditioned CG, one curvature product over ``batches()``
    (the remaining samples; ignored on a Jacobian cache) per iteration, until ``max_iter`` or

    - ``tol``: ``‖∇L'(δ)‖ ≤ tol·‖∇L'(start)‖`` (the CG residual, which is −∇L' along the iterates; retrain), or
    - ``error``: the certified bound ``‖δ − δ_ref‖ ≤ ‖∇L'(δ)‖/λ`` (λ ≤ the smallest curvature of L') is at most
      ``error·‖δ* − δ_ref‖``, which holds once ``‖∇L'(δ)‖/λ ≤ error/(1 + error)·‖δ − start‖`` (start = δ*; solve).

    A gradient ratio alone certifies nothing about δ: the directions of curvature λ (most of them when P ≫ N·C)
    show their error λ-small in the gradient, so a warm start stopped at ‖∇L'‖/‖∇L'(δ*)‖ = 1e-4 can keep nearly all
    of δ*'s error there (a test run with the head refitted did).
    """
    if (tol is None) == (error is None) or not 0 < (tol or error or 0) < 1 or max_iter < 1:
        raise ValueError(f"give one of tol and error in (0, 1), and max_iter >= 1; got {tol}, {error}, {max_iter}")
    started = time.perf_counter()
    start = start.detach().double()
    copy_flat_(start, objective.deltas)
    initial = objective.evaluate(batches(), gradient=True)
    assert initial.gradient is not None
    precondition, sketched = _preconditioner(objective, sketch_rank)
    cg = ConjugateGradient([-g.detach() for g in initial.gradient], precondition)
    weight_decay = objective.weight_decay

    def done() -> bool:
        if cg.relative_residual <= (tol if tol is not None else 1e-13):  # 1e-13: float64's floor
            return True
        return error is not None and cg.residual_norm / weight_decay <= error / (1 + error) * norm(cg.x)

    with torch.no_grad():
        while not done() and cg.iterations < max_iter:
            cg.advance(objective.hvp(batches(), cg.direction()))
            if cg.iterations % 100 == 0:
                log.info("CG iteration %d: ‖∇L'‖/‖∇L'(start)‖ = %.2e", cg.iterations, cg.relative_residual)
    delta = start + flatten(cg.x).detach()
    copy_flat_(delta, objective.deltas)
    return Solution(delta, cg.iterations, done(), time.perf_counter() - started, sketched)
