"""The Jacobian cache and Krylov recycling: the same LQF solve as through network passes, in float64."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, jacrev, vmap

from lqf_exp.jacobian_cache import JacobianCache, jacobian_cache_refusal
from lqf_exp.linearize import LinearizedNetwork
from lqf_exp.pipeline import solve_status_line
from lqf_exp.solvers import (
    CGSolver,
    ConjugateGradient,
    SolveController,
    StoppingRule,
    ValidationPath,
    conjugate_gradient,
)
from lqf_exp.solvers.deflation import KrylovSpace, sketch_dominant_subspace
from lqf_exp.solvers.objective import flatten, unflatten

from .helpers.nets import randomize_bn, tiny_cnn_net
from .helpers.problems import SmallProblem, small_problem


def reverse_mode_jacobian(net: LinearizedNetwork, x: torch.Tensor) -> torch.Tensor:
    """``[B, C, P]`` by ``vmap(jacrev)``: an implementation independent of the layer hooks."""
    params = dict(net.net.named_parameters())
    names = net.linearized_names
    point = {n: params[n].detach() for n in names}

    def single(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(net.net, p, (xi[None],), strict=False)[0]

    rows = vmap(jacrev(single), in_dims=(None, 0))(point, x)
    return torch.cat([rows[n].reshape(len(x), -1, point[n].numel()) for n in names], dim=2)


def cache_of(problem: SmallProblem, batch: int = 12) -> JacobianCache:
    return JacobianCache.build(problem.net, problem.batches(batch), len(problem.y))


@pytest.mark.parametrize("linearize", ["all", "layer2", "head"])
def test_hook_jacobian_equals_reverse_mode(linearize: str) -> None:
    torch.manual_seed(0)
    net = LinearizedNetwork(randomize_bn(tiny_cnn_net(torch.nn.LeakyReLU, width=3)).double(), linearize=linearize)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    assert torch.allclose(net.jacobian(x), reverse_mode_jacobian(net, x), rtol=0, atol=1e-12)


def test_cached_objective_equals_the_network_passes() -> None:
    problem = small_problem()
    objective, cached = problem.objective(), problem.objective()
    cached.attach_cache(cache_of(problem))
    torch.manual_seed(1)
    problem.set_delta(0.05 * torch.randn(sum(d.numel() for d in problem.net.delta_list()), dtype=torch.float64))
    batches = problem.batches(12)
    reference, fast = objective.evaluate(batches, gradient=True), cached.evaluate((), gradient=True)
    assert fast.objective == pytest.approx(reference.objective, rel=1e-12)
    assert torch.allclose(flatten(fast.gradient), flatten(reference.gradient), rtol=0, atol=1e-10)
    direction = [torch.randn_like(d) for d in problem.net.delta_list()]
    assert torch.allclose(flatten(cached.hvp((), direction)), flatten(objective.hvp(batches, direction)),
                          rtol=0, atol=1e-10)


def solve_with_cg(problem: SmallProblem, cache: JacobianCache | None) -> torch.Tensor:
    objective = problem.objective()
    objective.attach_cache(cache)
    controller = SolveController(CGSolver(tol=1e-12), StoppingRule(rel_gap=1e-15, max_epochs=500))
    batches = problem.batches(12)
    evaluate = lambda gradient: objective.evaluate(batches, gradient)  # noqa: E731
    controller.start(objective, len(problem.y), 1, evaluate)
    if cache is not None:
        controller.run_in_memory(evaluate, lambda: 0.0, lambda value: None)
    else:
        done = False
        while not done:
            controller.begin_pass()
            for x, y in batches:
                controller.step(x, y)
            done = controller.end_pass(evaluate, lambda: 0.0, lambda value: None)
    assert controller.status == "converged"
    return problem.delta()


def test_the_cache_gives_the_same_optimum_as_the_jvp_path() -> None:
    problem = small_problem()
    through_passes = solve_with_cg(problem, None)
    problem.set_delta(None)
    in_memory = solve_with_cg(problem, cache_of(problem))
    optimum = problem.optimum()
    assert float((in_memory - through_passes).norm() / optimum.norm()) <= 1e-8
    assert float((in_memory - optimum).norm() / optimum.norm()) <= 1e-8


def test_deflation_by_an_earlier_solve_is_exact_and_cheaper() -> None:
    problem = small_problem(n=48, width=4)
    J = problem.jacobian()
    with torch.no_grad():
        r = (problem.loss.targets(problem.y, 3, torch.float64) - problem.net.apply_to_base(problem.x)).reshape(-1)
    n, like = len(problem.y), problem.net.delta_list()
    data = (2.0 / n) * J.T @ J
    rhs = unflatten((2.0 / n) * J.T @ r, like)

    def solve(weight_decay: float, space: KrylovSpace | None) -> tuple[torch.Tensor, int]:
        matvec = lambda v: unflatten(data @ flatten(v) + weight_decay * flatten(v), like)  # noqa: E731
        deflation = space.deflation(weight_decay) if space is not None else None
        identity = lambda v: [t.clone() for t in v]  # noqa: E731
        precondition = identity if deflation is None else deflation.preconditioner(identity)
        cg = ConjugateGradient(rhs, precondition)
        while cg.relative_residual > 1e-10 and cg.iterations < 2000:
            p = cg.direction()
            hp = matvec(p)
            if space is not None:
                space.add(flatten(p), flatten(hp), weight_decay)
            cg.advance(hp)
        return flatten(cg.x), cg.iterations

    space = KrylovSpace(1.0)
    solve(1e-1, space)  # the first λ of a path fills the space
    plain_x, plain_iterations = solve(1e-2, None)
    deflated_x, deflated_iterations = solve(1e-2, space)
    exact = torch.linalg.solve(data + 1e-2 * torch.eye(data.shape[0], dtype=data.dtype), flatten(rhs))
    assert float((deflated_x - exact).norm() / exact.norm()) < 1e-7
    assert float((plain_x - exact).norm() / exact.norm()) < 1e-7
    assert deflated_iterations <= 0.6 * plain_iterations  # measured: 8 against 15


def test_path_ranks_converged_solutions_and_keeps_the_best_by_brute_force() -> None:
    """The λ the path records is the one whose exact optimum has the lowest validation loss."""
    problem = small_problem(n=36, seed=3)
    generator = torch.Generator().manual_seed(7)
    x_val = torch.randn(24, 3, 8, 8, generator=generator, dtype=torch.float64)
    y_val = torch.randint(0, 3, (24,), generator=generator)
    grid = [3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003]

    def validation_loss() -> float:
        with torch.no_grad():
            return float(problem.loss.per_sample(problem.net(x_val), y_val).mean())

    brute = {}
    for weight_decay in grid:
        problem.weight_decay = weight_decay
        problem.set_delta(problem.optimum())
        brute[weight_decay] = validation_loss()
    problem.set_delta(None)
    objective = problem.objective()
    objective.attach_cache(cache_of(problem))
    controller = SolveController(CGSolver(tol=1e-10), StoppingRule(rel_gap=1e-6, max_epochs=300))
    controller.path = ValidationPath(grid, patience=len(grid), rel_gap=1e-6, max_epochs=300)
    evaluate = lambda gradient: objective.evaluate((), gradient)  # noqa: E731
    objective.weight_decay = grid[0]

    def set_weight_decay(value: float) -> None:
        objective.weight_decay = value

    controller.start(objective, len(problem.y), 1, evaluate)
    controller.run_in_memory(evaluate, validation_loss, set_weight_decay)
    chosen = min(brute, key=brute.get)
    assert controller.path.best["weight_decay"] == chosen and objective.weight_decay == chosen
    for row in controller.path.results:
        assert row["converged"] and row["val_loss"] == pytest.approx(brute[row["weight_decay"]], rel=1e-4)
    problem.weight_decay = chosen
    assert float((problem.delta() - problem.optimum()).norm() / problem.optimum().norm()) < 1e-3  # gap 1e-6
    assert controller.status == "converged"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [({"limit_gb": None}, "null"), ({"world_size": 2}, "data parallelism"),
     ({"constant_curvature": False}, "not quadratic"), ({"limit_gb": 1.0}, "12950·1 rows")],
)
def test_the_cache_says_why_it_is_off(kwargs: dict, reason: str) -> None:
    settings = {"samples": 12950, "classes": 1, "params": 77370, "dtype": torch.float32, "limit_gb": 6.0,
                "world_size": 1, "constant_curvature": True} | kwargs
    assert reason in (jacobian_cache_refusal(**settings) or "")


def test_the_cache_is_on_when_it_fits_one_process() -> None:
    assert jacobian_cache_refusal(1295, 10, 77370, torch.float32, 6.0, 1, True) is None  # digits: 3.7 GB


def test_conjugate_gradient_function_accepts_no_deflation() -> None:
    matrix = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    x, _ = conjugate_gradient(lambda v: [matrix @ v[0]], [torch.tensor([1.0, 2.0], dtype=torch.float64)])
    assert torch.allclose(matrix @ x[0], torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_sketch_finds_the_dominant_subspace_and_its_products() -> None:
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(60, 60, generator=generator, dtype=torch.float64)).Q
    spectrum = torch.cat([torch.tensor([1e4, 5e3, 2e3, 1e3, 500.0], dtype=torch.float64),
                          torch.linspace(1.0, 2.0, 55, dtype=torch.float64)])
    matrix = (basis * spectrum) @ basis.T
    W, products = sketch_dominant_subspace(lambda V: matrix @ V, lambda V: V, 60, rank=10, iterations=2)
    assert torch.allclose(W.T @ W, torch.eye(10, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(products, matrix @ W, atol=1e-9)
    top = basis[:, :5]
    captured = torch.linalg.svdvals(top.T @ W)  # cosines of the principal angles
    assert float(captured.min()) > 0.999


def test_sketched_deflation_cuts_cg_iterations_on_a_stiff_spectrum() -> None:
    generator = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(80, 80, generator=generator, dtype=torch.float64)).Q
    spectrum = torch.cat([torch.logspace(4, 2, 10, dtype=torch.float64), torch.linspace(1, 3, 70, dtype=torch.float64)])
    matrix = (basis * spectrum) @ basis.T
    rhs = [torch.randn(80, generator=generator, dtype=torch.float64)]
    space = KrylovSpace(1.0)
    space.add_block(*sketch_dominant_subspace(lambda V: matrix @ V, lambda V: V, 80, rank=16, iterations=2), 2.0**-52)
    deflation = space.deflation(0.0)
    assert deflation is not None

    def iterations(precondition) -> int:  # noqa: ANN001
        cg = ConjugateGradient(rhs, precondition)
        while cg.relative_residual > 1e-10:
            cg.advance([matrix @ cg.direction()[0]])
        assert torch.allclose(matrix @ cg.x[0], rhs[0], atol=1e-7)
        return cg.iterations

    plain = iterations(lambda v: [t.clone() for t in v])
    deflated = iterations(deflation.preconditioner(lambda v: [t.clone() for t in v]))
    assert deflated <= plain / 2


def test_a_capped_solve_says_so_in_the_summary() -> None:
    line = solve_status_line({"status": "capped", "epochs": 100, "estimated_gap": 0.03, "grad_ratio": 0.2})
    assert line.startswith("NOT CONVERGED") and "3.0e-02" in line and "2.0e-01" in line
    assert "closed form" in solve_status_line({"status": "converged", "exact": True, "grad_ratio": 1e-9})
