"""The LQF solvers on a small float64 problem whose optimum is known in closed form, driven without Lightning."""

from __future__ import annotations

import copy

import pytest
import torch

from lqf_exp.losses import CrossEntropyLoss
from lqf_exp.solvers import (
    AdaptiveSolver,
    CGSolver,
    DivergenceError,
    DualSystem,
    KernelSolver,
    LQFObjective,
    SGDSolver,
    SolveController,
    Solver,
    StoppingRule,
    ValidationPath,
    WeightDecaySelection,
    conjugate_gradient,
)
from lqf_exp.solvers.objective import dot

from .helpers.problems import SmallProblem, small_problem


def drive(problem: SmallProblem, solver: Solver, stop: StoppingRule, batch: int = 12) -> SolveController:
    """Run a solve to its end the way the LQF module does, with a fixed batch order per pass."""
    objective = problem.objective()
    controller = SolveController(solver, stop)
    batches = problem.batches(batch)
    evaluate = lambda gradient: objective.evaluate(batches, gradient)  # noqa: E731
    controller.start(objective, len(problem.y), 1, evaluate)
    done, epoch = False, 0
    while not done:
        controller.begin_pass()
        order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(epoch)).tolist()
        for i in order:
            controller.step(*batches[i])
        done = controller.end_pass(evaluate, lambda: 0.0, lambda value: None)
        epoch += 1
    return controller


def relative_error(problem: SmallProblem, target: torch.Tensor) -> float:
    return float((problem.delta() - target).norm() / target.norm())


def test_kernel_solves_exactly_in_one_pass() -> None:
    problem = small_problem()
    controller = drive(problem, KernelSolver(), StoppingRule())
    assert controller.epochs == 1 and controller.status == "converged"
    assert relative_error(problem, problem.optimum()) < 1e-9


def test_cg_reaches_the_closed_form() -> None:
    problem = small_problem()
    controller = drive(problem, CGSolver(tol=1e-11), StoppingRule(rel_gap=1e-15, max_epochs=400))
    assert controller.status == "converged"
    assert relative_error(problem, problem.optimum()) < 1e-6
    assert controller.final is not None and controller.final.grad_norm is not None
    assert controller.final.grad_norm < 1e-10 * controller.progress.grad_norms[0]


def test_adaptive_reaches_the_closed_form_in_a_fixed_number_of_passes() -> None:
    problem = small_problem()
    controller = drive(problem, AdaptiveSolver(), StoppingRule(rel_gap=1e-15, max_epochs=40))
    assert controller.progress.epochs <= 40  # it may certify convergence (the CG phase reaching its tolerance) sooner
    assert relative_error(problem, problem.optimum()) < 1e-3


def test_quadratic_model_step_is_the_exact_minimizer_on_the_batch() -> None:
    """After a step, the batch gradient is orthogonal to every direction the step combined (first-order
    optimality of the exact quadratic along span{Δ, v}); without momentum it is the line minimizer."""
    problem = small_problem()
    objective = problem.objective()
    (x, y), other = problem.batches(12)[:2]
    for momentum in (False, True):
        problem.set_delta(None)
        solver = AdaptiveSolver(momentum=momentum, damping=0.0, min_damping=0.0)
        solver.bind(objective, len(problem.y))
        solver.step(*other)  # a first step elsewhere gives a previous update v
        previous = [t.clone() for t in solver.previous]
        _, grad, _ = objective.batch_gradient([(x, y)])
        direction = [-t for t in objective.precondition(grad)]
        report = solver.step(x, y)
        _, after, _ = objective.batch_gradient([(x, y)])
        scale = dot(grad, grad) ** 0.5
        assert abs(dot(after, direction)) < 1e-10 * scale * dot(direction, direction) ** 0.5
        if momentum:
            assert abs(dot(after, previous)) < 1e-10 * scale * dot(previous, previous) ** 0.5
            assert report["momentum"] != 0.0
        else:
            assert report["momentum"] == 0.0


def test_sgd_with_too_large_a_step_is_declared_diverged() -> None:
    problem = small_problem()
    with pytest.raises(DivergenceError, match=r"'lr': 10\.0.*weight_decay=0\.01"):
        drive(problem, SGDSolver(lr=10.0, schedule="constant"), StoppingRule(max_epochs=50))


@pytest.mark.parametrize("make", [AdaptiveSolver, lambda: CGSolver(tol=1e-12), lambda: SGDSolver(lr=1e-3)])
def test_a_resumed_solve_ends_where_an_uninterrupted_one_does(make) -> None:  # noqa: ANN001
    """Stopping after 3 passes, saving the state and continuing in fresh objects gives the same δ bit for bit."""
    whole = small_problem()
    drive(whole, make(), StoppingRule(rel_gap=1e-15, max_epochs=6))
    first = small_problem()
    stop = StoppingRule(rel_gap=1e-15, max_epochs=3)
    controller = drive(first, make(), stop)
    state = copy.deepcopy(controller.state_dict())
    resumed = SolveController(make(), StoppingRule(rel_gap=1e-15, max_epochs=6))
    resumed.load_state_dict(state)
    objective = first.objective()
    batches = first.batches(12)
    evaluate = lambda gradient: objective.evaluate(batches, gradient)  # noqa: E731
    resumed.start(objective, len(first.y), 1, evaluate)
    for epoch in range(3, 6):
        resumed.begin_pass()
        for i in torch.randperm(len(batches), generator=torch.Generator().manual_seed(epoch)).tolist():
            resumed.step(*batches[i])
        resumed.end_pass(evaluate, lambda: 0.0, lambda value: None)
    assert torch.equal(first.delta(), whole.delta())


def test_quadratic_solvers_refuse_a_moving_curvature_and_the_kernel_a_large_system() -> None:
    problem = small_problem()
    objective = LQFObjective(problem.net, CrossEntropyLoss(), 1e-2)
    for solver in (CGSolver(), KernelSolver()):
        with pytest.raises(ValueError, match="loss=ce"):
            solver.bind(objective, len(problem.y))
    with pytest.raises(ValueError, match="N·C = 108 rows.*max_rows=100"):
        KernelSolver(max_rows=100).bind(problem.objective(), len(problem.y))


def test_conjugate_gradient_function_solves_a_dense_system() -> None:
    g = torch.Generator().manual_seed(0)
    M = torch.randn(30, 30, generator=g, dtype=torch.float64)
    A = M @ M.T + 0.1 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, generator=g, dtype=torch.float64)
    x, state = conjugate_gradient(lambda v: [A @ v[0]], [b], tol=1e-12)
    torch.testing.assert_close(x[0], torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)
    assert state.relative_residual <= 1e-12


def dual_problem(n: int = 9, c: int = 3, p: int = 14, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, p, generator=g, dtype=torch.float64), torch.randn(n, c, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("weight_decay", [1e-3, 0.5])
def test_dual_solution_and_leave_one_out_are_exact(weight_decay: float) -> None:
    """δ* = Jᵀu solves the primal normal equations; the block leave-one-out residual equals refitting without
    each sample (the penalty μ = Nλ/2 of the full problem kept)."""
    J, r = dual_problem()
    n, c, p = J.shape
    system = DualSystem(J, r)
    delta, u = system.solve(weight_decay)
    rows = J.reshape(n * c, p)
    primal = torch.linalg.solve((2 / n) * rows.T @ rows + weight_decay * torch.eye(p, dtype=rows.dtype),
                                (2 / n) * rows.T @ r.reshape(-1))
    torch.testing.assert_close(delta, primal, rtol=1e-10, atol=1e-12)
    mu = system.ridge(weight_decay)
    loo = system.loo_residuals(weight_decay)
    for i in range(n):
        keep = [j for j in range(n) if j != i]
        K = rows.view(n, c, p)[keep].reshape(-1, p)
        u_i = torch.linalg.solve(K @ K.T + mu * torch.eye(K.shape[0], dtype=K.dtype), r[keep].reshape(-1))
        prediction = J[i] @ (K.T @ u_i)
        torch.testing.assert_close(loo[i], r[i] - prediction, rtol=1e-8, atol=1e-10)


def test_leave_one_out_through_a_head_fitted_on_the_same_samples_is_exact() -> None:
    """With a ridge head (linear smoother H on features) refitted without the left-out sample as well, the
    combined smoother's block formula equals the brute-force refit of both stages."""
    J, targets = dual_problem(seed=1)
    n, c, p = J.shape
    g = torch.Generator().manual_seed(2)
    features = torch.randn(n, 4, generator=g, dtype=torch.float64)
    head_mu = 0.7

    def head_hat(f: torch.Tensor) -> torch.Tensor:
        fc = f - f.mean(0)
        return fc @ torch.linalg.solve(fc.T @ fc + head_mu * torch.eye(4, dtype=f.dtype), fc.T) + 1.0 / len(f)

    H = head_hat(features)
    residual = targets - H @ targets
    system = DualSystem(J, residual)
    weight_decay = 0.2
    loo = system.loo_residuals(weight_decay, prior_hat=H)
    mu = system.ridge(weight_decay)
    for i in range(n):
        keep = [j for j in range(n) if j != i]
        fk = features[keep]
        fc_mean = fk.mean(0)
        t_mean = targets[keep].mean(0)
        W = torch.linalg.solve((fk - fc_mean).T @ (fk - fc_mean) + head_mu * torch.eye(4, dtype=fk.dtype),
                               (fk - fc_mean).T @ (targets[keep] - t_mean))
        head = lambda f, m=fc_mean, W=W, t=t_mean: (f - m) @ W + t  # noqa: E731
        rows = J[keep].reshape(-1, p)
        u = torch.linalg.solve(rows @ rows.T + mu * torch.eye(rows.shape[0], dtype=rows.dtype),
                               (targets[keep] - head(fk)).reshape(-1))
        prediction = head(features[i : i + 1])[0] + J[i] @ (rows.T @ u)
        torch.testing.assert_close(loo[i], targets[i] - prediction, rtol=1e-8, atol=1e-10)


def test_weight_decay_choice_follows_the_leave_one_out_minimum() -> None:
    J, r = dual_problem(n=12, seed=3)
    system = DualSystem(J, r)
    grid = [1e-4, 1e-2, 1.0, 100.0]
    choice = system.select_weight_decay(grid, targets=r)
    errors = [float(system.loo_residuals(v).pow(2).sum(1).mean()) for v in grid]
    assert choice.weight_decay == grid[errors.index(min(errors))]
    assert choice.loo_errors == pytest.approx(errors)


def test_validation_path_keeps_the_best_and_stops_after_a_rise() -> None:
    path = ValidationPath([1.0, 0.1, 0.01, 0.001], patience=1)
    delta = [torch.zeros(2)]
    assert path.record(5.0, 1.0, 3, delta)
    delta[0] += 1
    assert path.record(4.0, 0.5, 3, delta)  # better: kept
    delta[0] += 1
    assert not path.record(4.5, 0.2, 3, delta)  # worse: the path ends
    assert path.best["weight_decay"] == 0.1 and torch.equal(path.best_delta[0], torch.ones(2))
    restored = ValidationPath.from_state(copy.deepcopy(path.state_dict()))
    assert restored.results == path.results and restored.index == path.index


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"grid": []}, "non-empty"), ({"path": [0.1, 1.0]}, "largest"), ({"patience": 0}, "patience"),
     ({"rule": "test"}, "rule='test': expected one of leave_one_out, validation")],
)
def test_weight_decay_selection_rejects_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        WeightDecaySelection(**kwargs)


@pytest.mark.parametrize("make", [lambda: AdaptiveSolver(momentum=False), lambda: SGDSolver(lr=1e-3)])
def test_logged_batch_objective_and_full_objective_share_one_normalization(make) -> None:  # noqa: ANN001
    """solver/batch_objective (a step's report, at δ before the step) and solver/objective (the full evaluation) are
    both mean_n ℓ_n + (λ/2)‖δ‖²: on a step whose batch is the whole training set they are the same number."""
    problem = small_problem()
    problem.set_delta(0.1 * problem.optimum())  # a δ ≠ 0, so the penalty counts
    objective = problem.objective()
    whole = [(problem.x, problem.y)]
    before = objective.evaluate(problem.batches(12)).objective
    solver = make()
    solver.bind(objective, len(problem.y))
    solver.begin_epoch()
    report = solver.step(problem.x, problem.y)
    assert report["loss"] == pytest.approx(before, rel=1e-12)
    assert objective.evaluate(whole).objective < before  # the step moved δ; the report was taken before it
