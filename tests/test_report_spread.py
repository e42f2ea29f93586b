"""The spread study's report (issue 21, item 3): one factor at a time around the default LQF cell, objective gaps
against the most exact solve of the same problem, and the fine-tuning grid's spread beside it."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from lqf_exp.report import detect_kinds, load_cells, write_report

DEFAULT = {"task": "finetune", "recipe": None, "model": "small_resnet", "weights": "packaged",
           "activation": "leaky_relu", "loss": "mse", "precond": "kfac", "method": "lqf", "linearize": "all",
           "data": "fashion_mnist_target", "shots": None, "solver": "adaptive", "lr": None, "momentum": None,
           "weight_decay": "auto", "batch_size": 64, "seed": 0}


def _cell(root: Path, name: str, err: float, record: dict[str, Any] | None = None, status: str = "finished",
          **factors: Any) -> None:
    cell = root / name
    cell.mkdir(parents=True)
    payload: dict[str, Any] = {"status": status, "factors": {**DEFAULT, **factors}, "epochs": 1, "steps": 10,
                               "duration_s": 1.0, "solver": record or {}}
    if status == "finished":
        payload["metrics"] = {"test/acc": 1 - err / 100, "val/acc": 0.9, "val/acc_best": 0.9}
    else:
        payload["error"] = "objective diverged"
    (cell / "metrics.json").write_text(json.dumps(payload))


def _solve(objective: float, lam: float = 3.16, epochs: int = 12, gap: float | None = None) -> dict[str, Any]:
    record = {"objective": objective, "objective_start": 10.0, "weight_decay": lam, "epochs": epochs}
    return record if gap is None else {**record, "gap": gap}


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as handle:
        return {row["group"]: row for row in csv.DictReader(handle)}


@pytest.fixture
def spread_sweep(tmp_path: Path) -> Path:
    for bs, seed, err, objective in ((16, 0, 7.10, 2.02), (64, 0, 7.00, 2.01), (256, 0, 7.40, 2.05),
                                     (64, 1, 7.04, 2.01), (64, 2, 6.98, 2.01)):
        _cell(tmp_path, f"lqf/bs{bs}-s{seed}", err, _solve(objective), batch_size=bs, seed=seed)
    _cell(tmp_path, "lqf/ekfac", 7.02, _solve(2.011, epochs=20), precond="ekfac")
    _cell(tmp_path, "lqf/none", 7.30, _solve(2.10, epochs=400), precond="none")
    _cell(tmp_path, "lqf/cg", 7.00, _solve(2.0001, epochs=60), solver="cg")
    _cell(tmp_path, "lqf/kernel", 7.00, _solve(2.0, epochs=0), solver="kernel")
    _cell(tmp_path, "lqf/recorded-gap", 7.00, _solve(2.5, gap=5e-3), seed=3)  # the run knew L*: its gap is used
    for lr, bs, err in ((0.05, 16, 7.7), (0.05, 64, 6.2), (0.001, 16, 10.5), (0.001, 64, 12.1)):
        _cell(tmp_path, f"nlft/lr{lr}-bs{bs}", err, recipe="nlft", method="finetune", activation="relu",
              loss="ce", precond="none", solver=None, lr=lr, batch_size=bs, momentum=0.9)
    _cell(tmp_path, "nlft/lr0.5-bs16", 0.0, status="diverged", recipe="nlft", method="finetune", solver=None,
          lr=0.5, batch_size=16, momentum=0.9)
    return tmp_path


def test_spread_is_detected_and_not_taken_for_an_ablation(spread_sweep: Path) -> None:
    kinds = detect_kinds(load_cells(spread_sweep))
    assert "spread" in kinds and "ablation" not in kinds and "robustness" in kinds


def test_spread_one_factor_at_a_time_with_gaps_against_the_closed_form(spread_sweep: Path) -> None:
    path = write_report(spread_sweep, kind="spread")
    rows = _rows(path.parent / "spread.csv")
    batch = rows["LQF: batch_size"]
    assert batch["values"] == "16, 64, 256" and batch["n"] == "3"
    assert float(batch["test_err_min"]) == pytest.approx(7.00) and float(batch["test_err_max"]) == pytest.approx(7.40)
    # L* = 2.0 from the kernel cell; start 10: the worst of the batch cells is (2.05 − 2)/(10 − 2).
    assert float(batch["gap_max"]) == pytest.approx(0.05 / 8)
    seed = rows["LQF: seed"]  # seeds 0, 1, 2 and the cell that recorded its own gap (seed 3)
    assert seed["n"] == "4" and float(seed["gap_max"]) == pytest.approx(5e-3)
    precond = rows["LQF: precond"]
    assert precond["values"] == "ekfac, kfac, none" and precond["passes_min"] == "12" and precond["passes_max"] == "400"
    assert float(precond["gap_max"]) == pytest.approx(0.10 / 8)
    solver = rows["LQF: solver"]
    assert solver["n"] == "3" and float(solver["gap_max"]) == pytest.approx(0.01 / 8)
    assert float(solver["test_err_range"]) == pytest.approx(0.0)
    nlft = rows["NLFT: lr × batch"]
    assert nlft["n"] == "4" and nlft["n_not_finished"] == "1"
    assert float(nlft["test_err_min"]) == pytest.approx(6.2) and float(nlft["test_err_max"]) == pytest.approx(12.1)
    text = path.read_text()
    assert "| fashion_mnist_target | NLFT: lr × batch |" in text and "(+1 diverged/failed/missing)" in text
    assert (path.parent / "spread_fashion_mnist_target.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_an_exact_solve_there_is_no_gap(tmp_path: Path) -> None:
    for bs in (16, 64):
        _cell(tmp_path, f"bs{bs}", 7.0, _solve(2.1), batch_size=bs)
    # CG stopped by the method's 1% gap rule is no optimum: it does not serve as L*.
    _cell(tmp_path, "cg-loose", 7.0, {**_solve(2.05), "grad_ratio": 3.7e-2}, solver="cg")
    path = write_report(tmp_path, kind="spread")
    assert _rows(path.parent / "spread.csv")["LQF: batch_size"]["gap_max"] == ""
    assert "no such cell here: no gap" in path.read_text()


def test_cg_solved_tight_is_the_optimum_where_the_closed_form_does_not_fit(tmp_path: Path) -> None:
    for bs in (16, 64):
        _cell(tmp_path, f"bs{bs}", 7.0, _solve(2.1), batch_size=bs)
    _cell(tmp_path, "cg-tight", 7.0, {**_solve(2.0), "grad_ratio": 1e-6}, solver="cg")
    rows = _rows(write_report(tmp_path, kind="spread").parent / "spread.csv")
    assert float(rows["LQF: batch_size"]["gap_max"]) == pytest.approx(0.1 / 8)


def test_cells_that_declined_the_closed_form_get_their_own_rows(tmp_path: Path) -> None:
    exact = {"objective_star": 2.0, "exact": True, "gap": 0.0}
    for bs in (16, 64):  # the default: the closed form taken, 0 passes
        _cell(tmp_path, f"closed/bs{bs}", 7.0, {**_solve(2.0, epochs=0), **exact}, batch_size=bs)
    for bs, err, gap, epochs in ((16, 7.2, 4e-3, 30), (64, 7.1, 8e-3, 25)):  # take_closed_form=false: iterated
        record = {**_solve(2.03, epochs=epochs), "objective_star": 2.0, "exact": False, "gap": gap}
        _cell(tmp_path, f"iterated/bs{bs}", err, record, batch_size=bs)
    path = write_report(tmp_path, kind="spread")
    rows = _rows(path.parent / "spread.csv")
    closed, iterated = rows["LQF: batch_size"], rows["LQF from δ = 0: batch_size"]
    assert closed["n"] == "2" and closed["passes_max"] == "0" and float(closed["test_err_range"]) == 0.0
    assert iterated["n"] == "2" and (iterated["passes_min"], iterated["passes_max"]) == ("25", "30")
    assert float(iterated["gap_max"]) == pytest.approx(8e-3)
    assert float(iterated["test_err_range"]) == pytest.approx(0.1)
    assert "`method.take_closed_form=false`" in path.read_text()


def test_without_declined_cells_the_report_does_not_mention_them(spread_sweep: Path) -> None:
    path = write_report(spread_sweep, kind="spread")
    assert "take_closed_form" not in path.read_text()
    assert not any(group.startswith("LQF from") for group in _rows(path.parent / "spread.csv"))
