"""Learning-rate schedules over a run's optimizer steps (``conf/schedule``), stepped after every optimizer step.

A run's length is a number of steps that only the trainer knows once the data are loaded (``max_steps``, or epochs ×
batches), so each schedule is a factory of ``(optimizer, total_steps)`` and states its shape in fractions of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LambdaLR, LRScheduler, MultiStepLR

__all__ = ["constant", "cosine", "step_decay", "warmup_cosine"]


def _check_total(total_steps: int) -> int:
    if int(total_steps) < 1:
        raise ValueError(f"a schedule needs a run of at least one optimizer step, got total_steps={total_steps}")
    return int(total_steps)


def cosine(optimizer: Optimizer, total_steps: int, final_factor: float = 0.0) -> LRScheduler:
    """Cosine annealing from the optimizer's lr to ``final_factor`` × lr at the last step."""
    base = optimizer.param_groups[0]["lr"]
    return CosineAnnealingLR(optimizer, T_max=_check_total(total_steps), eta_min=final_factor * base)


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.1,
                  final_factor: float = 0.0) -> LRScheduler:
    """Linear warm-up from lr/W to lr over the first W = ``warmup_fraction`` × steps, then cosine to ``final_factor``.

    What a transformer trained from scratch with AdamW usually needs: its first steps, on an unconditioned Adam
    second-moment estimate, are the ones that diverge at full lr.
    """
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"schedule warmup_fraction is a fraction of the run in [0, 1), got {warmup_fraction}")
    total = _check_total(total_steps)
    warmup = max(1, round(warmup_fraction * total)) if warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def step_decay(optimizer: Optimizer, total_steps: int, milestones: Sequence[float] = (0.5, 0.8),
               gamma: float = 0.1) -> LRScheduler:
    """lr × ``gamma`` at each milestone, given as a fraction of the run's steps."""
    if any(not 0 < m < 1 for m in milestones):
        raise ValueError(f"schedule milestones are fractions of the run in (0, 1), got {list(milestones)}")
    total = _check_total(total_steps)
    return MultiStepLR(optimizer, milestones=[max(1, int(m * total)) for m in milestones], gamma=gamma)


def constant(optimizer: Optimizer, total_steps: int) -> LRScheduler:
    """The optimizer's lr throughout."""
    _check_total(total_steps)
    return ConstantLR(optimizer, factor=1.0, total_iters=0)
