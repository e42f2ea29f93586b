"""How much the default LQF result moves with what a user may change without meaning to change the answer — batch
size, the batch-order seed, the preconditioner, the solver — beside the spread of the methods that have a learning
rate over their lr × batch-size grid (the paper's Fig. 1, right).

LQF's cells vary one factor at a time around the default (batch 64, seed 0, K-FAC, the adaptive solver). The
objective gap of a cell is measured against the optimum of the same problem (data and λ), relative to the objective
at the solve's start, ``(L − L*)/(L(start) − L*)``: the gap the run recorded where it knew L* (λ by exact
leave-one-out), else against the closed form (``solver=kernel``) or CG solved to ‖∇L‖/‖∇L(0)‖ ≤ 1e-5
(``solver=cg`` with the method's gap rule set aside) of the same data and λ among the cells.

Where λ's leave-one-out solves the dual system exactly, the default run takes that closed form and never iterates
(0 passes, every factor's spread 0 by construction). Cells run with ``method.take_closed_form=false`` iterate from
δ = 0 to the solver's own tolerance instead, and get their own rows: those measure the solver.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lqf_exp.report.collect import Cell
from lqf_exp.report.markdown import Section, Table, fmt_num
from lqf_exp.report.plots import box_plot
from lqf_exp.report.stats import base_label, distinct

__all__ = ["DEFAULTS", "declined_closed_form", "is_spread_cell", "spread_section"]

DEFAULTS = {"batch_size": 64, "seed": 0, "precond": "kfac", "solver": "adaptive"}  # the one-at-a-time centre
REFERENCE_SOLVERS = ("kernel", "cg")  # most exact first
CG_REFERENCE_RATIO = 1e-5  # ‖∇L‖/‖∇L(0)‖ a CG cell must reach to stand for the optimum


def is_spread_cell(cell: Cell) -> bool:
    """An LQF cell of the spread study: every layer linearized, solved without a learning rate."""
    return base_label(cell.factors) == "lqf" and cell.get("solver") not in (None, "sgd")


def declined_closed_form(cell: Cell) -> bool:
    """A finished cell that knew its optimum (exact leave-one-out) and iterated toward it anyway
    (``method.take_closed_form=false``); a run that took the closed form records ``exact``."""
    return cell.finished and cell.solver.get("objective_star") is not None and not cell.solver.get("exact")


def _chosen_lambda(cell: Cell) -> float | None:
    value = cell.solver.get("weight_decay")
    return float(value) if isinstance(value, (int, float)) else None


def _optima(cells: Sequence[Cell]) -> dict[tuple[Any, float], tuple[float, str]]:
    """``(data, λ) → (L*, how)``: the objective of the most exact finished solve of that problem."""
    optima: dict[tuple[Any, float], tuple[float, str]] = {}
    for solver in reversed(REFERENCE_SOLVERS):  # the more exact one overwrites
        for cell in cells:
            lam, objective = _chosen_lambda(cell), cell.solver.get("objective")
            # CG counts only where it ran to a tight gradient (a CG cell under the method's 1% gap rule is not L*).
            tight = solver == "kernel" or (cell.solver.get("grad_ratio") or 1.0) <= CG_REFERENCE_RATIO
            if cell.finished and cell.get("solver") == solver and lam is not None and objective is not None and tight:
                optima[cell.get("data"), lam] = (float(objective), solver)
    return optima


def relative_gap(cell: Cell, optima: dict[tuple[Any, float], tuple[float, str]]) -> float | None:
    """``(L − L*)/(L(start) − L*)`` of a finished LQF cell, or None without an optimum of its problem. A run that
    knew L* (λ by exact leave-one-out solves the dual system) recorded this gap itself; that one is used first."""
    if cell.finished and isinstance(cell.solver.get("gap"), (int, float)):
        return max(0.0, float(cell.solver["gap"]))
    lam = _chosen_lambda(cell)
    objective, start = cell.solver.get("objective"), cell.solver.get("objective_start")
    if not cell.finished or lam is None or objective is None or start is None:
        return None
    optimum = optima.get((cell.get("data"), lam))
    if optimum is None or start <= optimum[0]:
        return None
    return max(0.0, (float(objective) - optimum[0]) / (float(start) - optimum[0]))


def _one_at_a_time(cells: Sequence[Cell], factor: str) -> list[Cell]:
    """The cells that differ from the default in ``factor`` at most."""
    return [c for c in cells if all(c.get(k) == v for k, v in DEFAULTS.items() if k != factor)]


def _spread_row(data: Any, group: str, values: str, cells: Sequence[Cell], gaps: list[float],
                passes: list[int], lambdas: list[float]) -> tuple[list[str], dict[str, Any]]:
    done = [c for c in cells if c.finished and c.test_err is not None]
    errs = [c.test_err for c in done]
    failed = len(cells) - len(done)
    low, high = (min(errs), max(errs)) if errs else (None, None)
    std = statistics.stdev(errs) if len(errs) > 1 else (0.0 if errs else None)
    row = [str(data), group, values, f"{len(done)}" + (f" (+{failed} diverged/failed/missing)" if failed else ""),
           "—" if low is None else f"{low:.2f}–{high:.2f}", "—" if low is None else f"{high - low:.2f}",
           "—" if std is None else f"{std:.2f}", f"{max(gaps):.1e}" if gaps else "—",
           f"{min(passes)}–{max(passes)}" if passes else "—",
           ", ".join(fmt_num(v) for v in sorted(set(lambdas))) or "—"]
    record = {"data": data, "group": group, "values": values, "n": len(done), "n_not_finished": failed,
              "test_err_min": low, "test_err_max": high, "test_err_range": None if low is None else high - low,
              "test_err_std": std, "gap_max": max(gaps) if gaps else None,
              "passes_min": min(passes) if passes else None, "passes_max": max(passes) if passes else None,
              "lambdas": " ".join(fmt_num(v) for v in sorted(set(lambdas)))}
    return row, record


def _factor_rows(data: Any, name: str, cells: Sequence[Cell], optima: dict[tuple[Any, float], tuple[float, str]],
                 rows: list[list[str]], records: list[dict[str, Any]], groups: dict[str, list[float]]) -> None:
    """One row (and one box of the figure) per factor that varies among ``cells``, the others at the default."""
    for factor in ("batch_size", "seed", "precond", "solver"):
        picked = _one_at_a_time(cells, factor)
        if len({c.get(factor) for c in picked}) < 2:
            continue
        values = ", ".join(fmt_num(v) for v in distinct(picked, factor))
        gaps = [g for g in (relative_gap(c, optima) for c in picked) if g is not None]
        passes = [int(c.solver["epochs"]) for c in picked if c.finished and c.solver.get("epochs") is not None]
        lambdas = [lam for lam in (_chosen_lambda(c) for c in picked if c.finished) if lam is not None]
        row, record = _spread_row(data, f"{name}: {factor}", values, picked, gaps, passes, lambdas)
        rows.append(row)
        records.append(record)
        groups[f"{name} {factor}"] = [c.test_err for c in picked if c.finished]


def spread_section(cells: Sequence[Cell], out_dir: Path) -> list[Section]:
    """One table (spread per data set and factor) and one figure per data set (test error of every cell)."""
    cells = [c for c in cells if c.get("data") is not None]
    lqf = [c for c in cells if is_spread_cell(c)]
    optima = _optima(lqf)
    rows, records, plots = [], [], []
    for data in distinct(cells, "data"):
        mine = [c for c in lqf if c.get("data") == data]
        groups: dict[str, list[float]] = {}
        # Not finished cells stay with the default: without a solve record, nothing says they declined.
        for name, subset in (("LQF", [c for c in mine if not declined_closed_form(c)]),
                             ("LQF from δ = 0", [c for c in mine if declined_closed_form(c)])):
            _factor_rows(data, name, subset, optima, rows, records, groups)
        for label in ("lqf_sgd", "nlft"):
            grid = [c for c in cells if c.get("data") == data and c.get("lr") is not None
                    and (c.get("solver") == "sgd" if label == "lqf_sgd" else base_label(c.factors) == "nlft")]
            if not grid:
                continue
            values = (f"lr {', '.join(fmt_num(v) for v in distinct(grid, 'lr'))} × batch "
                      f"{', '.join(fmt_num(v) for v in distinct(grid, 'batch_size'))}")
            name = "LQF, SGD (paper)" if label == "lqf_sgd" else "NLFT"
            row, record = _spread_row(data, f"{name}: lr × batch", values, grid, [], [], [])
            rows.append(row)
            records.append(record)
            groups[f"{name} lr×batch"] = [c.test_err for c in grid if c.finished]
        if groups:
            plots.append(box_plot(out_dir / f"spread_{data}.png", groups, f"Test error of every cell, {data}",
                                  "test error (%)", zero_line=False).name)
    header = ["data set", "what varies", "values", "cells", "test error range (%)", "max − min", "std",
              "max objective gap", "passes", "λ chosen"]
    table = Table("spread", "Spread of the test error over each factor (LQF: one factor at a time around the default)",
                  header, rows, records)
    how = sorted({how for _, how in optima.values()})
    notes = [
        "LQF varies one factor at a time around its default (batch 64, seed 0, `precond=kfac`, `solver=adaptive`); "
        "the fine-tuning rows span their whole lr × batch grid, diverged cells counted apart.",
        "Objective gap: `(L − L*)/(L(start) − L*)`, as the run recorded it where it knew L* (λ by exact "
        "leave-one-out), else with L* the objective of the same data and λ solved "
        + (f"by `solver={'` or `solver='.join(how)}`" if how else "exactly (no such cell here: no gap)")
        + "; passes: the solver's recorded passes over the data (`solver.epochs` in metrics.json).",
    ]
    if any(declined_closed_form(c) for c in lqf):
        notes.insert(1, "Where λ's leave-one-out solves the dual system exactly, the default takes that closed form "
                     "(0 passes); the rows `LQF from δ = 0` are the same factors run with "
                     "`method.take_closed_form=false`, each solve iterating from δ = 0 to its own tolerance: they "
                     "measure the solver.")
    return [Section("Spread over batch size, seed, preconditioner and solver (robustness, Fig. 1 right)", notes,
                    [table], plots)]
