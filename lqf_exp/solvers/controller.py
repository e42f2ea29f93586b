"""One LQF solve, pass by pass: the solver, its stopping rule, the optional validation λ path, and the record.

Free of Lightning: :class:`~lqf_exp.methods.LQF` feeds it batches and tells it when a pass ends, tests drive it
with plain loops. Everything a resumed run needs to end at the same answer is in :meth:`state_dict`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from lqf_exp.solvers.base import Solver
from lqf_exp.solvers.objective import Evaluation, LQFObjective
from lqf_exp.solvers.stopping import SolveProgress, StoppingRule
from lqf_exp.solvers.weight_decay import ValidationPath

log = logging.getLogger(__name__)

__all__ = ["SolveController"]

Evaluate = Callable[[bool], Evaluation]


class SolveController:
    """Runs ``solver`` on an objective until ``rule`` says converged (or its cap), then walks ``path`` if any.

    ``rule`` is the method's (frozen) stopping rule, ``progress`` the record of the current solve it decides on.
    ``status`` is ``running``, ``converged`` or ``capped`` (the pass cap ended it first); divergence raises
    :class:`~lqf_exp.solvers.stopping.DivergenceError` from the stopping rule. ``epochs`` counts the solver's passes
    over the training data, ``eval_passes`` the passes spent evaluating the full objective for the stopping rule.
    """

    def __init__(self, solver: Solver, rule: StoppingRule) -> None:
        self.solver, self.rule = solver, rule
        self.progress = SolveProgress()
        self.objective: LQFObjective | None = None
        self.path: ValidationPath | None = None
        self.status = "running"
        self.epochs = 0
        self.eval_passes = 0
        self.final: Evaluation | None = None
        self.objective_star: float | None = None  # L* when an exact (dual) solve gave it
        self.in_memory = False  # the solve ran on the Jacobian cache (passes are iterations on the stored J)
        self.exact = False  # δ* was taken from the dual system's closed form
        # One row per recorded point: pass count, λ, objective, gradient norm (when known), seconds since the start.
        self.history: list[dict[str, float | None]] = []
        self._clock = time.perf_counter()
        self._elapsed = 0.0  # seconds of earlier sessions (a resumed run)

    # -- setup ------------------------------------------------------------------------------------------------
    def start(self, objective: LQFObjective, train_size: int, world_size: int, evaluate: Evaluate,
              scale: float = 0.0) -> None:
        """Bind the solver; on a fresh solve evaluate the starting point (the reference of the stopping rule).

        ``scale``: the zero predictor's objective (``loss.zero_predictor_loss``), the size of L the divergence test
        measures a rise against besides the start (which vanishes when the training set is interpolated).
        """
        self.objective = objective
        self.progress.scale = float(scale)
        self.solver.bind(objective, train_size, world_size)
        if not self.progress.objectives:
            self._record(evaluate(True))  # the gradient at the start makes the final one a relative certificate

    @property
    def active_rule(self) -> StoppingRule:
        """The rule of the solve now running: a validation path's solves use its (looser) tolerance and cap."""
        if self.path is not None and not self.path.done:
            return replace(self.rule, rel_gap=self.path.rel_gap, max_epochs=self.path.max_epochs)
        return self.rule

    def context(self) -> str:
        assert self.objective is not None
        return f"{self.solver.settings()}, weight_decay={self.objective.weight_decay:g}"

    def _append_history(self, evaluation: Evaluation) -> None:
        assert self.objective is not None
        self.history.append({
            "epoch": float(self.epochs), "weight_decay": self.objective.weight_decay,
            "objective": evaluation.objective, "grad_norm": evaluation.grad_norm,
            "seconds": self._elapsed + time.perf_counter() - self._clock,
        })

    def _record(self, evaluation: Evaluation) -> bool:
        self._append_history(evaluation)
        converged = self.active_rule.update(self.progress, evaluation.objective, evaluation.grad_norm,
                                            self.context(), self.solver.settled)
        self.final = evaluation
        return converged

    # -- one pass ---------------------------------------------------------------------------------------------
    def begin_pass(self) -> None:
        self.solver.begin_epoch()

    def step(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        return self.solver.step(x, y)

    def end_pass(self, evaluate: Evaluate, validation_loss: Callable[[], float],
                 set_weight_decay: Callable[[float], None]) -> bool:
        """Close a pass; True when the whole solve (path included) is finished."""
        report = self.solver.end_epoch()
        self.epochs += 1
        rule = self.active_rule
        if report is None:
            report = evaluate(rule.grad_norm is not None)
            self.eval_passes += 1
        converged = self._record(report) or self.solver.converged
        self.solver.observe(self.progress.progress())
        finished = converged or rule.exhausted(self.progress)
        path = self.path if self.path is not None and not self.path.done else None
        if path is None:
            if not finished:
                return False
            self.status = "converged" if converged else "capped"
            return True
        if not finished:
            return False
        assert self.objective is not None
        if path.record(validation_loss(), report.objective, self.progress.epochs, self.objective.deltas, converged):
            self._restart(set_weight_decay, evaluate, path.current)
            return False
        # The path has ranked its λs. Its best solution is the answer when it was solved to the method's own
        # tolerance; otherwise (a looser path) solve it on, from there, to full tolerance.
        path.done = True  # from here on, active_rule is the method's own rule
        self._restore_best()
        best = path.best
        if best.get("converged", False) and path.rel_gap <= self.rule.rel_gap:
            set_weight_decay(best["weight_decay"])
            self.final = evaluate(True)
            self.eval_passes += 1
            self._append_history(self.final)
            self.status = "converged"
            return True
        self._restart(set_weight_decay, evaluate, best["weight_decay"])
        return False

    def run_in_memory(self, evaluate: Evaluate, validation_loss: Callable[[], float],
                      set_weight_decay: Callable[[float], None]) -> None:
        """The whole solve, path included, when the objective's products come from the Jacobian cache: each of the
        solver's "passes" is then one iteration on the stored matrix, with no network pass and no data loader."""
        assert self.objective is not None and self.objective.in_memory
        self.in_memory = True
        while True:
            self.begin_pass()
            done = self.end_pass(evaluate, validation_loss, set_weight_decay)
            row = self.history[-1]
            if done or self.epochs % 10 == 0:  # progress: no Lightning pass reports it
                log.info("in-memory solve: iteration %d, λ = %g, objective %.6g, %.0f s", self.epochs,
                         row["weight_decay"], row["objective"], row["seconds"])
            if done:
                return

    def accept_optimum(self, delta: Sequence[Tensor], evaluate: Evaluate) -> None:
        """δ* known in closed form (the dual system that chose λ solved it): take it; the solve is done."""
        assert self.objective is not None
        with torch.no_grad():
            for target, value in zip(self.objective.deltas, delta, strict=True):
                target.copy_(value.to(target))
        self.final = evaluate(True)
        self.eval_passes += 1
        self._append_history(self.final)
        self.status, self.exact = "converged", True

    def _restart(self, set_weight_decay: Callable[[float], None], evaluate: Evaluate, weight_decay: float) -> None:
        set_weight_decay(weight_decay)
        self.solver.restart()
        # The gap of every solve is measured from δ = 0, where L and ∇L do not depend on λ (the penalty vanishes):
        # relative to its own warm start, a later λ would have to reach a far smaller absolute gap than the first.
        first = self.history[0]
        self.progress.reset((float(first["objective"]), first["grad_norm"]))
        self._record(evaluate(True))
        self.eval_passes += 1

    def _restore_best(self) -> None:
        assert self.path is not None and self.path.best_delta is not None and self.objective is not None
        for delta, best in zip(self.objective.deltas, self.path.best_delta, strict=True):
            delta.data.copy_(best.to(delta))

    def certify(self, evaluate: Evaluate) -> Evaluation:
        """The objective and its gradient at the final δ (one more pass unless the last report had the gradient)."""
        if self.final is None or self.final.gradient is None:
            self.final = evaluate(True)
            self.eval_passes += 1
        return self.final

    # -- record -----------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What metrics.json records about the solve."""
        assert self.objective is not None
        final = self.final
        start = self.history[0]["objective"] if self.history else None  # at δ = 0 (the same for every λ)
        start_grad = self.history[0]["grad_norm"] if self.history else None
        out: dict[str, Any] = {
            **self.solver.settings(),
            "status": self.status,
            "weight_decay": self.objective.weight_decay,
            "objective": None if final is None else final.objective,
            "objective_start": start,
            "grad_norm": None if final is None else final.grad_norm,
            "grad_norm_start": start_grad,
            "epochs": self.epochs,
            "eval_passes": self.eval_passes,
            "in_memory": self.in_memory,
            "exact": self.exact,
        }
        if self.status == "capped":
            out["estimated_gap"] = self.progress.estimated_gap()
        if final is not None and final.grad_norm is not None and out["grad_norm_start"]:
            out["grad_ratio"] = final.grad_norm / out["grad_norm_start"]
        if self.objective_star is not None and final is not None and start is not None:
            out["objective_star"] = self.objective_star
            out["gap"] = (final.objective - self.objective_star) / max(start - self.objective_star, 1e-300)
        if self.path is not None:
            out["weight_decay_path"] = self.path.results
        out["history"] = self.history
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"solver": self.solver.state_dict(), "stop": self.progress.state_dict(), "status": self.status,
                "in_memory": self.in_memory, "exact": self.exact,
                "epochs": self.epochs, "eval_passes": self.eval_passes, "objective_star": self.objective_star,
                "path": None if self.path is None else self.path.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.solver.load_state_dict(state["solver"])
        self.progress.load_state_dict(state["stop"])
        self.status, self.epochs, self.eval_passes = state["status"], int(state["epochs"]), int(state["eval_passes"])
        self.objective_star = state["objective_star"]
        self.in_memory, self.exact = bool(state.get("in_memory", False)), bool(state.get("exact", False))
        self.path = None if state["path"] is None else ValidationPath.from_state(state["path"])
        self.history = [dict(row) for row in state["history"]]
        self._elapsed = float(self.history[-1]["seconds"] or 0.0) if self.history else 0.0
