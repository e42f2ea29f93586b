"""The dual system's two routes to leave-one-out (eigendecomposition for a λ grid, Cholesky at one λ) agree with
each other and with refitting, and influence's exact path is the Cholesky route."""

from __future__ import annotations

import pytest
import torch

from lqf_exp.influence.core import exact_leave_one_out
from lqf_exp.solvers import DualSystem


def problem(n: int = 9, c: int = 3, p: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, p, generator=g, dtype=torch.float64), torch.randn(n, c, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("weight_decay", [1e-3, 0.5])
def test_cholesky_route_matches_the_eigendecomposition_and_refitting(weight_decay: float) -> None:
    J, r = problem()
    n, c, p = J.shape
    system = DualSystem(J, r)
    loo = system.leave_one_out(weight_decay)
    torch.testing.assert_close(loo.loo_residual, system.loo_residuals(weight_decay), rtol=1e-8, atol=1e-10)
    delta = system.solve(weight_decay)[0]
    mu = system.ridge(weight_decay)
    for i in range(n):
        keep = [j for j in range(n) if j != i]
        rows = J[keep].reshape(-1, p)
        without = rows.T @ torch.linalg.solve(rows @ rows.T + mu * torch.eye(rows.shape[0], dtype=rows.dtype),
                                              r[keep].reshape(-1))
        torch.testing.assert_close(loo.directions[i], delta - without, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(loo.loo_residual[i], r[i] - J[i] @ without, rtol=1e-8, atol=1e-10)


def test_influence_uses_the_dual_system() -> None:
    J, e = problem(seed=1)
    system = DualSystem(J, e).leave_one_out(0.1, errors=e)
    result = exact_leave_one_out(J, e, 0.1)
    torch.testing.assert_close(result.directions, system.directions, rtol=0, atol=0)
    torch.testing.assert_close(result.loo_residual, system.loo_residual, rtol=0, atol=0)
    torch.testing.assert_close(result.residual, e)
    with pytest.raises(ValueError, match="weight_decay > 0"):
        exact_leave_one_out(J, e, 0.0)
