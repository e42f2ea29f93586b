"""The stopping rule (frozen config) and the solve's record (state): convergence, divergence, resume, the λ path."""

from __future__ import annotations

import dataclasses
import math

import pytest

from lqf_exp.losses import CrossEntropyLoss, ScaledMSELoss
from lqf_exp.solvers import CGSolver, DivergenceError, SolveController, StoppingRule, ValidationPath
from lqf_exp.solvers.stopping import SolveProgress

from .helpers.problems import small_problem

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/helpers/runtime.py: tiny tensors


def test_stopping_rule_stops_on_quiet_passes_and_on_the_gradient() -> None:
    rule, record = StoppingRule(rel_gap=1e-2, patience=2), SolveProgress()
    for value in (10.0, 5.0, 2.5):  # halving once more: geometric or a 1/k power tail, which never ends
        assert not rule.update(record, value, None, "")
    assert record.estimated_gap() == 1.0
    for value in (1.25, 0.625):  # four halvings: geometric 0.625, power tail 0.625·4/(log2/log(4/3) − 1)
        assert not rule.update(record, value, None, "")
    tail = 0.625 * 4 / (math.log(2) / math.log(4 / 3) - 1)
    assert record.estimated_gap() == pytest.approx(tail / (9.375 + tail))
    assert not rule.update(record, 0.62, None, "")  # tiny decreases: quiet once
    assert rule.update(record, 0.6199, None, "")  # quiet twice: converged
    gradient_rule, record = StoppingRule(grad_norm=1e-3), SolveProgress()
    assert not gradient_rule.update(record, 1.0, 100.0, "")
    assert gradient_rule.update(record, 0.9, 0.05, "")
    capped, record = StoppingRule(max_epochs=2), SolveProgress()
    for value in (3.0, 2.0, 1.0):
        capped.update(record, value, None, "")
    assert capped.exhausted(record)


def test_gap_estimate_is_not_fooled_by_a_sublinear_tail() -> None:
    """L_k − L* = 1/√(k+1): a geometric extrapolation of the last decreases claims < 1% at k = 100 (true: 10%)."""
    rule, record = StoppingRule(), SolveProgress()
    for k in range(101):
        rule.update(record, (k + 1) ** -0.5, None, "")
    true_gap = 101**-0.5 / 1.0
    assert 0.5 * true_gap < record.estimated_gap() < 1.5 * true_gap


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e9])
def test_stopping_rule_declares_divergence(value: float) -> None:
    rule, record = StoppingRule(divergence=1e3), SolveProgress()
    rule.update(record, 1.0, None, "solver settings")
    with pytest.raises(DivergenceError, match="solver settings"):
        rule.update(record, value, None, "solver settings")


def test_zero_predictor_scale_comes_from_the_loss() -> None:
    assert ScaledMSELoss(target_scale=15.0).zero_predictor_loss(10) == pytest.approx(225.0)  # Σ_c (0 − 15·onehot)²
    assert CrossEntropyLoss().zero_predictor_loss(7) == pytest.approx(math.log(7))


def test_an_interpolating_start_is_no_false_alarm_but_a_real_blow_up_is_caught() -> None:
    """The smoke run's case: the probe head interpolates its batch, L(0) ≈ 1e-8, and the next pass scores 22. Against
    the start alone that is a 10⁹-fold rise; against the zero predictor's α² = 225 it is a modest objective."""
    scale = ScaledMSELoss(target_scale=15.0).zero_predictor_loss(10)
    rule = StoppingRule(divergence=1e3)
    record = SolveProgress(scale=scale)
    rule.update(record, 8.6e-9, None, "")
    assert not rule.update(record, 22.13, None, "")
    for blow_up in (1e3 * scale * 2, float("nan")):
        with pytest.raises(DivergenceError, match="exploded|became"):
            rule.update(record, blow_up, None, "cg settings")
    # Without a scale (a record nobody gave one) the rule is relative to the start, as before.
    bare = SolveProgress()
    rule.update(bare, 8.6e-9, None, "")
    with pytest.raises(DivergenceError, match="exploded"):
        rule.update(bare, 22.13, None, "")


def test_the_rule_is_frozen_and_validated() -> None:
    rule = StoppingRule(rel_gap=1e-2, max_epochs=100)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.rel_gap = 0.5  # type: ignore[misc]
    looser = dataclasses.replace(rule, rel_gap=0.1, max_epochs=5)
    assert (looser.rel_gap, looser.max_epochs, rule.rel_gap, rule.max_epochs) == (0.1, 5, 1e-2, 100)
    for bad in ({"rel_gap": 1.0}, {"grad_norm": 0.0}, {"patience": 0}, {"divergence": 1.0}, {"max_epochs": 0}):
        with pytest.raises(ValueError, match="invalid method.stop"):
            StoppingRule(**bad)
        with pytest.raises(ValueError, match="invalid method.stop"):
            dataclasses.replace(rule, **bad)


def test_progress_loads_the_state_the_stateful_rule_wrote() -> None:
    """Checkpoints written before the split hold the rule's state under these keys; they must still load."""
    old = {"objectives": [3.0, 2.0, 1.5], "grad_norms": [10.0, None, 2.0], "quiet": 1, "reference": (4.0, 12.0)}
    record = SolveProgress()
    record.load_state_dict(old)
    assert (record.epochs, record.quiet, record.reference) == (2, 1, (4.0, 12.0))
    assert set(record.state_dict()) == set(old)
    again = SolveProgress()
    again.load_state_dict(record.state_dict())
    assert again == record


def test_a_validation_path_loosens_a_copy_of_the_rule_not_the_rule() -> None:
    """The path's solves run under its tolerance and cap; the configured rule object is never rewritten."""
    problem = small_problem()
    objective = problem.objective()
    batches = problem.batches(12)
    rule = StoppingRule(rel_gap=1e-9, max_epochs=5)
    controller = SolveController(CGSolver(tol=1e-14), rule)
    controller.path = ValidationPath([1.0, 0.1], patience=1, rel_gap=0.2, max_epochs=2)
    evaluate = lambda gradient: objective.evaluate(batches, gradient)  # noqa: E731

    def set_weight_decay(value: float) -> None:
        objective.weight_decay = value

    controller.start(objective, len(problem.y), 1, evaluate, scale=problem.loss.zero_predictor_loss(3))
    assert controller.active_rule == dataclasses.replace(rule, rel_gap=0.2, max_epochs=2)
    done = False
    while not done:
        controller.begin_pass()
        for x, y in batches:
            controller.step(x, y)
        done = controller.end_pass(evaluate, lambda: 1.0 / (1 + controller.epochs), set_weight_decay)
    results = controller.path.results
    assert [row["weight_decay"] for row in results] == [1.0, 0.1] and all(row["epochs"] <= 2 for row in results)
    assert controller.path.done and controller.active_rule is rule
    assert (rule.rel_gap, rule.max_epochs) == (1e-9, 5)
    # The last solve (from the best λ, to the method's tolerance) ran past the path's cap of 2 passes.
    assert controller.epochs - sum(row["epochs"] for row in results) == 5 and controller.status == "capped"
