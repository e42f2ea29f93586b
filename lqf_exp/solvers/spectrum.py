"""The largest eigenvalue of the preconditioned LQF Hessian ``P·H``, by power iteration with exact curvature products.

``P·H`` is similar to the symmetric ``P^{1/2} H P^{1/2}`` (P symmetric positive definite), so its eigenvalues are real
and positive; the largest one is the step that a fixed-learning-rate preconditioned method must stay below
(``lr < 2/λmax``), and the measure of how well a preconditioner captures the curvature (1 for ``P = H⁻¹``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from lqf_exp.solvers.objective import Batch, LQFObjective, Vectors, norm


def preconditioned_max_eigenvalue(
    objective: LQFObjective,
    batches: Callable[[], Iterable[Batch]],
    iterations: int = 30,
    rel_tol: float = 1e-3,
    seed: int = 0,
) -> tuple[float, int]:
    """``(λmax(P·H), iterations used)``: power iteration from a random start until two successive estimates agree
    to ``rel_tol``. ``batches()`` yields the full training data for each curvature product."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    generator = torch.Generator().manual_seed(seed)
    vector: Vectors = [torch.randn(d.shape, generator=generator, dtype=torch.float64).to(d.device)
                       for d in objective.deltas]
    scale = 1.0 / norm(vector)
    vector = [v * scale for v in vector]
    estimate = 0.0
    for step in range(1, iterations + 1):
        image = objective.precondition(objective.hvp(batches(), vector))
        previous, estimate = estimate, norm(image)
        vector = [v / estimate for v in image]
        if step > 1 and abs(estimate - previous) <= rel_tol * estimate:
            return estimate, step
    return estimate, iterations
