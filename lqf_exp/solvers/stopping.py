"""When an LQF solve ends: convergence of the full-training-set objective, a cap, or divergence.

Two objects, because Hydra builds one of them from config and the solve fills the other: :class:`StoppingRule` is
the frozen rule (``method.stop``), :class:`SolveProgress` the record of one solve (its objectives, gradient norms,
quiet passes, reference point and scale), which checkpoints carry. The decisions are the rule's methods, taking the
record: a λ path's solves use a looser rule (``dataclasses.replace``) on a record of the same kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DivergenceError", "SolveProgress", "StoppingRule"]


class DivergenceError(RuntimeError):
    """The objective became non-finite or exploded; the message names the solver settings."""


@dataclass
class SolveProgress:
    """What one solve has recorded: the objective after each pass (the first entry is its start), the gradient norm
    where known, how many quiet passes in a row, and ``reference``: ``(L, ‖∇L‖)`` at δ = 0, against which a
    warm-started solve (another λ of a path) measures its gap and gradient ratio (None: its own start).

    ``scale`` is an objective size that cannot vanish (the loss of the all-zero predictor, per sample): the
    divergence test compares against it as well as against the start, since the start is ≈ 0 when the problem
    interpolates its training set (a probe head on a one-batch smoke run). Not checkpointed: the controller sets it
    again when it binds the objective.
    """

    objectives: list[float] = field(default_factory=list)
    grad_norms: list[float | None] = field(default_factory=list)
    quiet: int = 0
    reference: tuple[float, float | None] | None = None
    scale: float = 0.0

    def reset(self, reference: tuple[float, float | None] | None = None) -> None:
        """Forget the passes recorded (a new solve); ``reference`` as in the class docstring. ``scale`` stays."""
        self.objectives, self.grad_norms, self.quiet = [], [], 0
        self.reference = reference

    @property
    def epochs(self) -> int:
        """Passes recorded after the starting point."""
        return max(0, len(self.objectives) - 1)

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

    # The keys are those StoppingRule.state_dict wrote when it held this record: older checkpoints load.
    def state_dict(self) -> dict[str, Any]:
        return {"objectives": list(self.objectives), "grad_norms": list(self.grad_norms), "quiet": self.quiet,
                "reference": self.reference}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.objectives = [float(v) for v in state["objectives"]]
        self.grad_norms = [None if v is None else float(v) for v in state["grad_norms"]]
        self.quiet = int(state["quiet"])
        reference = state.get("reference")
        self.reference = None if reference is None else (float(reference[0]), reference[1])


@dataclass(frozen=True)
class StoppingRule:
    """Decides after each pass over the data whether the solve has converged, failed, or goes on.

    Converged when, for ``patience`` consecutive passes, the estimated remaining gap relative to the whole
    decrease, ``(L_k − L*) / (L_0 − L*)``, is below ``rel_gap`` (:meth:`SolveProgress.estimated_gap`); or at once
    when ``‖∇L‖/‖∇L_0‖ ≤ grad_norm`` (checked only where the gradient is known). Diverged when L is not finite or
    exceeds ``divergence × (L_0 + scale)``, ``scale`` the zero predictor's loss (:class:`SolveProgress`).
    ``max_epochs`` caps the passes of one solve.
    """

    rel_gap: float = 1e-2
    grad_norm: float | None = None
    patience: int = 2
    divergence: float = 1e3
    max_epochs: int = 100

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

    def check_divergence(self, progress: SolveProgress, objective: float, grad_norm: float | None,
                         context: str) -> None:
        """Raise :class:`DivergenceError` (``context`` in the message) on a non-finite or exploding objective."""
        if not math.isfinite(objective) or (grad_norm is not None and not math.isfinite(grad_norm)):
            raise DivergenceError(f"the LQF objective became {objective} ({context})")
        start = progress.objectives[0] if progress.objectives else objective
        # Relative to the start alone, an interpolating start (L_0 ≈ 1e-8) would make any later rise a blow-up.
        limit = self.divergence * (max(start, 0.0) + progress.scale)
        if objective > max(limit, 1e-300):
            raise DivergenceError(
                f"the LQF objective exploded: {objective:.4g} > {self.divergence:g} × (its start {start:.4g} + the "
                f"zero predictor's {progress.scale:.4g}) ({context})"
            )

    def update(self, progress: SolveProgress, objective: float, grad_norm: float | None, context: str,
               settled: bool = True) -> bool:
        """Record the objective after a pass in ``progress`` (the first call records the start); True when
        converged.

        ``settled=False`` (a solver whose progress is still limited by sampling noise) records the pass but lets
        no quiet pass count towards convergence. Raises :class:`DivergenceError` (with ``context`` in the message)
        on a non-finite or exploding objective.
        """
        self.check_divergence(progress, objective, grad_norm, context)
        progress.objectives.append(float(objective))
        progress.grad_norms.append(None if grad_norm is None else float(grad_norm))
        if len(progress.objectives) == 1:
            return False
        g0 = progress.grad_norms[0] if progress.reference is None else progress.reference[1]
        if settled and self.grad_norm is not None and grad_norm is not None and g0 and grad_norm <= self.grad_norm * g0:
            return True
        estimate = progress.estimated_gap()
        quiet = settled and estimate is not None and estimate < self.rel_gap
        progress.quiet = progress.quiet + 1 if quiet else 0
        return progress.quiet >= self.patience

    def exhausted(self, progress: SolveProgress) -> bool:
        return progress.epochs >= self.max_epochs
