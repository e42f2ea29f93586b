"""solver=sgd: stochastic gradient descent with heavy-ball momentum and a fixed (cosine-annealed) learning rate.

The update direction is the preconditioned mini-batch gradient ``P g`` (``P`` from the ``precond`` group), so
``precond=kfac`` gives the paper's K-FAC-preconditioned SGD and ``precond=none`` plain SGD. Kept for the
paper-faithful ablation cells and the learning-rate robustness sweep; the learning rate decides whether it converges.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lqf_exp.solvers.base import Solver
from lqf_exp.solvers.objective import Vectors
from lqf_exp.solvers.stopping import DivergenceError

__all__ = ["SGDSolver"]

SCHEDULES = ("constant", "cosine")


class SGDSolver(Solver):
    """``b ← m b + P g``, ``δ ← δ − lr_t b`` with ``lr_t`` constant or cosine-annealed over ``schedule_epochs``."""

    name = "sgd"

    def __init__(self, lr: float = 1e-3, momentum: float = 0.9, schedule: str = "cosine",
                 schedule_epochs: int = 100) -> None:
        super().__init__()
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"solver.lr must be a number > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"solver.momentum must be in [0, 1), got {momentum}")
        if schedule not in SCHEDULES:
            raise ValueError(f"solver.schedule must be one of {SCHEDULES}, got {schedule!r}")
        if int(schedule_epochs) < 1:
            raise ValueError(f"solver.schedule_epochs must be >= 1, got {schedule_epochs}")
        self.lr, self.momentum, self.schedule = float(lr), float(momentum), schedule
        self.schedule_epochs = int(schedule_epochs)
        self.buffer: Vectors | None = None
        self.epoch = 0
        self.steps = 0

    def settings(self) -> dict[str, Any]:
        return {"solver": self.name, "lr": self.lr, "momentum": self.momentum, "schedule": self.schedule,
                "preconditioned": self.bound.preconditioner is not None}

    def current_lr(self) -> float:
        if self.schedule == "constant":
            return self.lr
        t = min(self.epoch, self.schedule_epochs) / self.schedule_epochs
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * t))

    def restart(self) -> None:
        self.buffer, self.epoch = None, 0

    def end_epoch(self) -> None:
        self.epoch += 1

    def step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        objective = self.bound
        value, grad, _ = objective.batch_gradient([(x, y)])
        if not math.isfinite(value):
            raise DivergenceError(f"the mini-batch objective became {value} at step {self.steps} ({self.settings()})")
        direction = objective.precondition(grad)
        if self.buffer is None:
            self.buffer = [d.clone() for d in direction]
        else:
            self.buffer = [(self.momentum * b.to(d.device) + d) for b, d in zip(self.buffer, direction, strict=True)]
        lr = self.current_lr()
        with torch.no_grad():
            for delta, b in zip(objective.deltas, self.buffer, strict=True):
                delta.add_(b.to(delta.dtype), alpha=-lr)
        self.steps += 1
        return {"loss": value, "lr": lr}

    def state_dict(self) -> dict[str, Any]:
        buffer = None if self.buffer is None else [t.detach().cpu() for t in self.buffer]
        return {"buffer": buffer, "epoch": self.epoch, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer, self.epoch, self.steps = state["buffer"], int(state["epoch"]), int(state["steps"])
