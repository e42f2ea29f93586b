"""λmax(P·H) by power iteration equals the largest eigenvalue of the dense product, with and without K-FAC."""

from __future__ import annotations

import pytest
import torch

from lqf_exp.curvature import CurvatureTargets
from lqf_exp.delta_layout import flat_size, flatten, unflatten
from lqf_exp.precond import KFACOperator
from lqf_exp.solvers import preconditioned_max_eigenvalue
from lqf_exp.solvers.objective import LQFObjective

from .helpers.problems import small_problem


def dense(apply, size: int, like: list[torch.Tensor]) -> torch.Tensor:  # noqa: ANN001
    """The matrix of a linear map on δ-shaped vectors, column by column."""
    columns = []
    for i in range(size):
        unit = torch.zeros(size, dtype=torch.float64)
        unit[i] = 1.0
        columns.append(flatten(apply(unflatten(unit, like))))
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize("preconditioned", [False, True])
def test_power_iteration_finds_the_largest_eigenvalue_of_the_preconditioned_hessian(preconditioned: bool) -> None:
    problem = small_problem(n=18)
    objective: LQFObjective = problem.objective()
    batches = problem.batches(6)
    if preconditioned:
        net = problem.net
        targets = CurvatureTargets(network=net.base_network, layers=net.curvature_layers(), loss=problem.loss,
                                   constant=True, damping_offset=problem.weight_decay, outputs_fn=net)
        operator = KFACOperator(targets, damping=1e-3)
        operator.estimate(batches)
        objective.attach(operator)
    size = flat_size(objective.deltas)
    hessian = dense(lambda v: objective.hvp(batches, v), size, objective.deltas)
    product = dense(objective.precondition, size, objective.deltas) @ hessian
    expected = torch.linalg.eigvals(product).real.max().item()

    estimate, used = preconditioned_max_eigenvalue(objective, lambda: batches, iterations=500, rel_tol=1e-9)
    assert used < 500
    assert estimate == pytest.approx(expected, rel=1e-4)


def test_power_iteration_needs_an_iteration() -> None:
    problem = small_problem(n=6)
    with pytest.raises(ValueError, match="iterations must be >= 1, got 0"):
        preconditioned_max_eigenvalue(problem.objective(), lambda: problem.batches(6), iterations=0)
