"""When an LQF solve ends: convergence of the full-training-set objective, a cap, or divergence."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DivergenceError", "StoppingRule"]


class DivergenceError(RuntimeError):
    """The objective became non-finite or exploded; the message names the solver settings."""


@dataclass
class StoppingRule:
    """Decides after each pass over the data whether the solve has converged, failed, or goes on.

    Converged when, for ``patience`` consecutive passes, the estimated remaining gap relative to the whole
    decrease, ``(L_k − L*) / (L_0 − L*)``, is below ``rel_gap`` (:meth:`estimated_gap`); or at once when
    ``‖∇L‖/‖∇L_0‖ ≤ grad_norm`` (checked only where the gradient is known). Diverged when L is not finite or
    exceeds ``divergence × L_0``. ``max_epochs`` caps the passes of one solve.
    """

    rel_gap: float = 1e-2
    grad_norm: float | None = None
    patience: int = 2
    divergence: float = 1e3
    max_epochs: int = 100
    objectives: list[float] = field(default_factory=list)
    grad_norms: list[float | None] = field(default_factory=list)
    _quiet: int = 0
    reference: tuple[float, float | None] | None = None

    def __post_init__(self) -> None:
        checks = (
            ("rel_gap", self.rel_gap, 0 < self.rel_gap < 1),
            ("grad_norm", self.grad_norm, self.grad_norm is None or self.grad_norm > 0),
            ("patience", self.patience, int(self.patience) >= 1),
            ("divergence", self.divergence, self.divergence > 1),
            ("max_epochs", self.max_epochs, int(self.max_epochs) >= 1),
        )
        for name, value, ok in checks:
            if not ok:
                raise ValueError(f"invalid method.stop.{name}={value!r}: rel_gap must be in (0, 1), grad_norm > 0 "
                                 "(or null), patience and max_epochs >= 1, divergence > 1")

    def reset(self, reference: tuple[float, float | None] | None = None) -> None:
        """Forget the passes recorded; ``reference``: ``(L, ‖∇L‖)`` at δ = 0, against which a warm-started solve
        (another λ of a path) measures its gap and gradient ratio, as the first solve does (else: its own start)."""
        self.objectives, self.grad_norms, self._quiet = [], [], 0
        self.reference = reference

    @property
    def epochs(self) -> int:
        """Passes recorded after the starting point."""
        return max(0, len(self.objectives) - 1)

    def update(self, objective: float, grad_norm: float | None, context: str, settled: bool = True) -> bool:
        """Record the objective after a pass (the first call records the start); True when converged.

        ``settled=False`` (a solver whose progress is still limited by sampling noise) records the pass but lets
        no quiet pass count towards convergence. Raises :class:`DivergenceError` (with ``context`` in the message)
        on a non-finite or exploding objective.
        """
        start = self.objectives[0] if self.objectives else objective
        if not math.isfinite(objective) or (grad_norm is not None and not math.isfinite(grad_norm)):
            raise DivergenceError(f"the LQF objective became {objective} ({context})")
        if objective > self.divergence * max(start, 1e-300):
            raise DivergenceError(
                f"the LQF objective exploded: {objective:.4g} > {self.divergence:g} × its start {start:.4g} ({context})"
            )
        self.objectives.append(float(objective))
        self.grad_norms.append(None if grad_norm is None else float(grad_norm))
        if len(self.objectives) == 1:
            return False
        g0 = self.grad_norms[0] if self.reference is None else self.reference[1]
        if settled and self.grad_norm is not None and grad_norm is not None and g0 and grad_norm <= self.grad_norm * g0:
            return True
        estimate = self.estimated_gap()
        quiet = settled and estimate is not None and estimate < self.rel_gap
        self._quiet = self._quiet + 1 if quiet else 0
        return self._quiet >= self.patience

    def progress(self) -> float:
        """The last pass's share of the decrease so far, ``(L_{k-1} − L_k)/(L_0 − L_k)`` (1 before any pass)."""
        if len(self.objectives) < 2:
            return 1.0
        total = self.objectives[0] - self.objectives[-1]
        return (self.objectives[-2] - self.objectives[-1]) / total if total > 0 else -1.0

    def estimated_gap(self) -> float | None:
        """``(L_k − L*)/(L_0 − L*)`` estimated from the decreases over the last two windows of ``w = k//4`` passes
        (one pass while k < 8); None when they do not allow it (a rise, no progress yet).

        The remaining decrease is extrapolated two ways and the larger is kept: geometrically (the rate of the last
        window against the one before, at most 0.99), and as a power-law tail ``d_j ∝ j^{-p}`` with ``p`` from the
        same two windows (infinite for ``p ≤ 1``). Preconditioned CG on an ill-conditioned quadratic converges
        sublinearly for long stretches: on digits at λ = 1 the geometric rule alone declared a 1% gap when the
        true one was 4%. The power-law tail costs one to two passes on a problem that converges linearly.
        """
        passes = len(self.objectives) - 1
        if passes < 2:
            return None
        width = max(1, passes // 4)
        values = self.objectives
        before = values[passes - 2 * width] - values[passes - width]
        last = values[passes - width] - values[passes]
        if last < 0 or before <= 0:
            return None
        rate = min(last / before, 0.99)
        remaining = last * rate / (1.0 - rate)
        if last > 0:
            exponent = math.log(before / last) / math.log(passes / (passes - width))
            remaining = max(remaining, math.inf if exponent <= 1 else last / width * passes / (exponent - 1))
        done = (values[0] if self.reference is None else self.reference[0]) - values[passes]
        if math.isinf(remaining):
            return 1.0
        return remaining / (done + remaining) if done + remaining > 0 else 0.0

    def exhausted(self) -> bool:
        return self.epochs >= self.max_epochs

    def state_dict(self) -> dict[str, Any]:
        return {"objectives": list(self.objectives), "grad_norms": list(self.grad_norms), "quiet": self._quiet,
                "reference": self.reference}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.objectives = [float(v) for v in state["objectives"]]
        self.grad_norms = [None if v is None else float(v) for v in state["grad_norms"]]
        self._quiet = int(state["quiet"])
        reference = state.get("reference")
        self.reference = None if reference is None else (float(reference[0]), reference[1])
