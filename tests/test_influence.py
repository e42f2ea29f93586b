"""Leave-one-out influence against retraining without each sample (float64, exact solves of the reduced problems):
the dual (exact) path, the preconditioned path with the exact Hessian inverse, and with K-FAC where K-FAC is exact
(only the linear head linearized)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lqf_exp.curvature import CurvatureTargets
from lqf_exp.influence import exact_influence, jacobian_chunks, kfac_rows, preconditioned_influence
from lqf_exp.linearize import LinearizedNetwork
from lqf_exp.precond import KFACOperator
from lqf_exp.solvers import DualSystem

from .helpers.problems import SmallProblem, small_problem

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/helpers/runtime.py

RTOL = 1e-6


def problem_arrays(problem: SmallProblem) -> tuple[Tensor, Tensor]:
    """``J [N, C, P]`` and ``r [N, C]`` of the problem at w0."""
    with torch.no_grad():
        r = problem.loss.targets(problem.y, 3, torch.float64) - problem.net.apply_to_base(problem.x)
    return problem.net.jacobian(problem.x).detach(), r


def solve(J: Tensor, r: Tensor, mu: float) -> Tensor:
    """``argmin Σ_n ‖r_n − J_n δ‖² + μ‖δ‖²`` (dense, float64)."""
    rows = J.reshape(-1, J.shape[-1])
    return torch.linalg.solve(rows.T @ rows + mu * torch.eye(rows.shape[1], dtype=rows.dtype), rows.T @ r.reshape(-1))


def retrained(J: Tensor, r: Tensor, weight_decay: float, eval_J: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(e, change [N, M, C], loo residuals [N, C])`` by solving the problem without each sample in turn."""
    N = len(J)
    mu = N * weight_decay / 2  # the full problem's penalty is kept (sum form)
    full = solve(J, r, mu)
    e = r - J @ full
    changes, loo = [], []
    for i in range(N):
        keep = [n for n in range(N) if n != i]
        without = solve(J[keep], r[keep], mu)
        changes.append(eval_J @ (full - without))
        loo.append(r[i] - J[i] @ without)
    return e, torch.stack(changes), torch.stack(loo)


def close(actual: Tensor, expected: Tensor, rtol: float = RTOL) -> None:
    scale = expected.abs().max()
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * float(scale))


@pytest.fixture(scope="module")
def case() -> dict[str, Tensor | float]:
    problem = small_problem(n=60, weight_decay=1e-2, seed=4)
    J, r = problem_arrays(problem)
    g = torch.Generator().manual_seed(9)
    eval_x = torch.randn(7, 3, 8, 8, generator=g, dtype=torch.float64)
    eval_J = problem.net.jacobian(eval_x).detach()
    e, change, loo = retrained(J, r, problem.weight_decay, eval_J)
    return {"J": J, "r": r, "eval_J": eval_J, "e": e, "change": change, "loo": loo, "wd": problem.weight_decay}


def test_exact_influence_matches_retraining(case: dict) -> None:
    result = exact_influence(case["J"], case["e"], case["eval_J"], case["wd"])
    close(result.change, case["change"])
    close(result.loo_residual, case["loo"])
    expected_fsi = case["change"].pow(2).sum(dim=2).mean(dim=1)
    close(result.informativeness, expected_fsi)
    assert bool((result.informativeness >= 0).all())


def test_closed_form_leave_one_out_matches_retraining(case: dict) -> None:
    """The dual system's ``(I − S_ii)⁻¹ e_i`` (what λ selection uses) is the retrained residual."""
    close(DualSystem(case["J"], case["r"]).loo_residuals(case["wd"]), case["loo"])


def test_preconditioned_path_with_the_exact_hessian_inverse_matches_retraining(case: dict) -> None:
    J, N = case["J"], len(case["J"])
    rows = J.reshape(-1, J.shape[-1])
    hessian = (2.0 / N) * rows.T @ rows + case["wd"] * torch.eye(rows.shape[1], dtype=rows.dtype)
    chunks = [(J[i:i + 16], case["e"][i:i + 16]) for i in range(0, N, 16)]
    result = preconditioned_influence(chunks, N, case["eval_J"], lambda v: torch.linalg.solve(hessian, v.T).T)
    close(result.change, case["change"])
    close(result.loo_residual, case["loo"])


def test_self_influence_is_the_leverage_times_the_loo_residual(case: dict) -> None:
    result = exact_influence(case["J"], case["e"], case["J"], case["wd"])
    diagonal = result.change.diagonal(dim1=0, dim2=1).T  # [N, C]: change of f(x_i) when i is left out
    close(diagonal, case["r"] - case["e"] - (case["r"] - case["loo"]))  # f(x_i) − f₋ᵢ(x_i) = ẽ_i − e_i
    close(result.self_influence, diagonal.pow(2).sum(dim=1))


def test_a_sample_without_prediction_error_has_no_influence() -> None:
    """Targets chosen so that sample 0 is fitted exactly at the optimum: leaving it out changes nothing."""
    problem = small_problem(n=30, weight_decay=1e-2, seed=5)
    J, r = problem_arrays(problem)
    N, C, _ = J.shape
    mu = N * problem.weight_decay / 2
    rows = J.reshape(N * C, -1)
    kernel = rows @ rows.T
    smoother = (kernel @ torch.linalg.inv(kernel + mu * torch.eye(N * C, dtype=kernel.dtype))).view(N, C, N, C)
    # e_0 = (I − S_00) r_0 − Σ_{n≠0} S_0n r_n = 0
    others = torch.einsum("cnd,nd->c", smoother[0, :, 1:, :], r[1:])
    r = r.clone()
    r[0] = torch.linalg.solve(torch.eye(C, dtype=r.dtype) - smoother[0, :, 0, :], others)
    e, change, _ = retrained(J, r, problem.weight_decay, J)
    assert float(e[0].abs().max()) < 1e-10 * float(r.abs().max())
    assert float(change[0].abs().max()) < 1e-9 * float(change.abs().max())
    result = exact_influence(J, e, J, problem.weight_decay)
    assert float(result.informativeness[0]) < 1e-16 * float(result.informativeness.max())


def test_kfac_influence_is_exact_where_kfac_is_exact() -> None:
    """With only the linear head linearized, K-FAC of the MSE objective is its exact Hessian (a Kronecker product),
    so the K-FAC path of the influence must reproduce retraining."""
    problem = small_problem(n=40, weight_decay=5e-2, seed=6)
    net = LinearizedNetwork(problem.net.base_network, linearize="head")
    targets = CurvatureTargets(network=net.base_network, layers=net.curvature_layers(), loss=problem.loss,
                               constant=True, damping_offset=problem.weight_decay, outputs_fn=net)
    operator = KFACOperator(targets, damping=1e-12)  # γ = λ + 1e-12: K-FAC without extra damping
    operator.estimate([(problem.x, problem.y)])
    with torch.no_grad():
        r = problem.loss.targets(problem.y, 3, torch.float64) - net.apply_to_base(problem.x)
    J = net.jacobian(problem.x).detach()
    e, change, loo = retrained(J, r, problem.weight_decay, J[:5])
    batches = [(problem.x[i:i + 8], problem.y[i:i + 8]) for i in range(0, 40, 8)]
    solve_delta = solve(J, r, len(J) * problem.weight_decay / 2)
    with torch.no_grad():
        net.delta_list()[0].copy_(solve_delta[: net.delta_list()[0].numel()].view_as(net.delta_list()[0]))
        net.delta_list()[1].copy_(solve_delta[net.delta_list()[0].numel():])
    chunks = list(jacobian_chunks(net, problem.loss, batches, dtype=torch.float64))
    close(torch.cat([c[1] for c in chunks]), e)
    result = preconditioned_influence(chunks, len(J), J[:5], kfac_rows(operator, net))
    close(result.change, change)
    close(result.loo_residual, loo)
