"""task=online: increments balanced over classes, and LQF warm-started from δ_{t−1} ends at the paragon's δ (the
same convex problem from scratch) when both are solved to optimality."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lqf_exp.online import increments
from lqf_exp.pipeline import run
from lqf_exp.solvers import CGSolver, StoppingRule

from .helpers.problems import SmallProblem, small_problem
from .test_solvers import drive


def test_increments_are_disjoint_complete_and_balanced() -> None:
    labels = np.repeat(np.arange(4), [10, 12, 9, 30])
    parts = increments(labels, 3, seed=0)
    flat = sorted(i for part in parts for i in part)
    assert flat == list(range(len(labels)))
    for part in parts:
        counts = np.bincount(labels[part], minlength=4)
        assert counts.min() >= 3 and counts[3] == 10
    with pytest.raises(ValueError, match="task.steps=10"):
        increments(labels, 10, seed=0)


def test_warm_start_from_the_previous_step_reaches_the_cold_optimum() -> None:
    """The solver-level property the protocol relies on (float64): δ* of the first 24 samples as the start of the
    36-sample solve ends at the same δ* as a cold start, in fewer passes."""
    problem = small_problem(n=36)
    first = SmallProblem(problem.net, problem.x[:24], problem.y[:24], problem.loss, problem.weight_decay)
    drive(first, CGSolver(tol=1e-12), StoppingRule(rel_gap=1e-15, max_epochs=400))
    previous = first.delta().clone()
    cold = drive(problem, CGSolver(tol=1e-12), StoppingRule(rel_gap=1e-15, max_epochs=400))
    cold_delta = problem.delta().clone()
    problem.set_delta(previous)
    warm = drive(problem, CGSolver(tol=1e-12), StoppingRule(rel_gap=1e-15, max_epochs=400))
    optimum = problem.optimum()
    for delta in (cold_delta, problem.delta()):
        assert float((delta - optimum).norm() / optimum.norm()) < 1e-6
    assert warm.epochs <= cold.epochs


def test_online_protocol_writes_one_row_per_step_and_mode(make_cfg, tmp_path: Path) -> None:
    overrides = ["task=online", "task.steps=2", "data.shots=2", "model.weights=null", "logger=csv",
                 "trainer.accelerator=cpu", "callbacks.progress_bar.refresh_rate=0", "precond=none",
                 "method.weight_decay=1.0", "method.linearize=layer3"]
    payload = run(make_cfg(overrides, tmp_path))
    assert payload["status"] == "finished" and payload["factors"]["task"] == "online"
    with (tmp_path / "online.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["step"]), int(r["samples"]), r["mode"]) for r in rows] == [
        (t, 10 * t, mode) for t in (1, 2) for mode in ("incremental", "paragon")]
    assert all(0 <= float(r["test_err"]) <= 100 for r in rows)
    assert json.loads((tmp_path / "metrics.json").read_text())["online"][-1]["samples"] == 20
    online_md = (tmp_path / "online.md").read_text()
    assert (tmp_path / "online.png").is_file() and "| 2 | 20 |" in online_md
    assert "- Code: commit " in online_md and "- Machine: " in online_md and str(tmp_path) not in online_md
    state = torch.load(tmp_path / "online_state.pt", weights_only=True)
    assert {"rows", "incremental", "paragon"} <= set(state) and len(state["rows"]) == 4
    logged = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "online/incremental_test_err" in logged and "online/paragon_test_err" in logged
