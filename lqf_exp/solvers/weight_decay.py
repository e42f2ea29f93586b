"""``method.weight_decay=auto``: the one hyper-parameter of LQF, chosen without a grid search on held-out data.

When the dual system fits (``N·C`` rows within the limits), λ is the value of ``grid`` with the smallest exact
leave-one-out error (:meth:`~lqf_exp.solvers.dual.DualSystem.select_weight_decay`; one eigendecomposition serves the
whole grid). Otherwise the solver runs along ``path`` (largest λ first), each solve warm-started from the previous
one and stopped by the stopping rule, and the solution with the lowest validation loss is kept
(:class:`ValidationPath`); the path ends early once the validation loss has risen ``patience`` times in a row.
``rule=validation`` takes the path even where leave-one-out fits (to compare the two rules).
λ is ranked on converged solutions: each solve of the path stops at ``path_rel_gap`` (by default the method's own
tolerance) or after ``path_max_epochs`` passes, and the solution with the lowest validation loss is the answer when it
converged (a looser path would rank solutions far from the optima being compared: at 5 passes per λ the digits path
compared objectives 50× above them). A path looser than the method's tolerance solves the chosen λ on from its path
solution. Every λ shares the data curvature, so the solver's recycled Krylov space
(:mod:`lqf_exp.solvers.deflation`) makes the later solves cheaper than the first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["WEIGHT_DECAY_GRID", "ValidationPath", "WeightDecaySelection"]

RULES = ("leave_one_out", "validation")

# λ per sample (the (λ/2)‖δ‖² of a batch-mean loss), half-decades from 1e-6 to 1e4.
WEIGHT_DECAY_GRID: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-12, 9))


@dataclass
class WeightDecaySelection:
    """Settings of ``weight_decay=auto`` (see the module docstring)."""

    grid: Sequence[float] = WEIGHT_DECAY_GRID
    path: Sequence[float] = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)
    path_rel_gap: float = 1e-2
    path_max_epochs: int = 100
    max_rows: int = 6000
    max_memory_gb: float = 4.0
    patience: int = 1
    rule: str = "leave_one_out"  # or "validation": the validation-loss path even where leave-one-out fits

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"weight_decay_selection.rule={self.rule!r}: expected one of {', '.join(RULES)}")
        self.grid, self.path = [float(v) for v in self.grid], [float(v) for v in self.path]
        if not self.grid or not self.path or min(self.grid + self.path) <= 0:
            raise ValueError(f"weight_decay_selection grid and path must be non-empty lists of values > 0, got "
                             f"{self.grid}, {self.path}")
        if self.path != sorted(self.path, reverse=True):
            raise ValueError(f"weight_decay_selection.path must go from the largest λ down, got {self.path}")
        if not (0 < self.path_rel_gap < 1 and int(self.path_max_epochs) >= 1):
            raise ValueError(f"weight_decay_selection.path_rel_gap must be in (0, 1) and path_max_epochs >= 1, got "
                             f"{self.path_rel_gap}, {self.path_max_epochs}")
        if int(self.patience) < 1:
            raise ValueError(f"weight_decay_selection.patience must be >= 1, got {self.patience}")


@dataclass
class ValidationPath:
    """The warm-started λ path scored on validation loss; it keeps the best solution seen."""

    values: list[float]
    patience: int = 1
    rel_gap: float = 1e-2
    max_epochs: int = 100
    index: int = 0
    done: bool = False
    results: list[dict[str, Any]] = field(default_factory=list)
    best_delta: list[Tensor] | None = None
    _rises: int = 0

    @property
    def current(self) -> float:
        return self.values[self.index]

    @property
    def best(self) -> dict[str, Any]:
        return min(self.results, key=lambda r: r["val_loss"])

    def record(self, val_loss: float, objective: float, epochs: int, delta: list[Tensor],
               converged: bool = True) -> bool:
        """Score the solve at the current λ (``converged``: it met its tolerance, not its cap); True when the path
        goes on to the next λ."""
        improved = not self.results or val_loss < self.best["val_loss"]
        self.results.append({"weight_decay": self.current, "val_loss": float(val_loss), "objective": float(objective),
                             "epochs": float(epochs), "converged": bool(converged)})
        if improved:
            self.best_delta = [d.detach().clone() for d in delta]
        self._rises = 0 if improved else self._rises + 1
        if self._rises >= self.patience or self.index + 1 >= len(self.values):
            return False
        self.index += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        best = None if self.best_delta is None else [t.cpu() for t in self.best_delta]
        return {"values": self.values, "patience": self.patience, "rel_gap": self.rel_gap,
                "max_epochs": self.max_epochs, "index": self.index, "done": self.done, "results": self.results,
                "best_delta": best, "rises": self._rises}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ValidationPath:
        path = cls([float(v) for v in state["values"]], int(state["patience"]), float(state["rel_gap"]),
                   int(state["max_epochs"]), int(state["index"]), bool(state["done"]),
                   [dict(r) for r in state["results"]], state["best_delta"])
        path._rises = int(state["rises"])
        return path
