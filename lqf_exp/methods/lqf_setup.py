"""Setting up an LQF solve: the Jacobian cache, λ for ``weight_decay=auto`` (and parsing the values that may say
``auto``). Functions of what they read (:class:`TrainingSet`) that return what they decide; the LQF module applies
it, so this module needs nothing of the module's."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from lqf_exp.jacobian_cache import JacobianCache, jacobian_cache_refusal
from lqf_exp.linearize import LinearizedNetwork
from lqf_exp.losses import ClassificationLoss
from lqf_exp.solvers import DualSystem, Solver, ValidationPath, WeightDecaySelection, check_kernel_size

log = logging.getLogger(__name__)

__all__ = ["TrainingSet", "WeightDecayChoice", "build_dual_system", "build_jacobian_cache", "choose_weight_decay",
           "leave_one_out_refusal", "parse_weight_decay"]


def parse_weight_decay(value: Any, key: str) -> float | None:
    """``auto`` → None (to be chosen); a number ≥ 0 → float; anything else raises a ValueError naming ``key``."""
    if isinstance(value, str) and value == "auto":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    raise ValueError(f"invalid {key}={value!r}: expected 'auto' or a number >= 0")


@dataclass
class TrainingSet:
    """What setting up a solve reads of the run: the linearized network, the loss, the training samples in order
    (``batches()`` yields them at the evaluation batch size) and the number of processes."""

    net: LinearizedNetwork
    loss: ClassificationLoss
    data: Any
    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    num_classes: int
    world_size: int

    @property
    def params(self) -> int:
        return sum(d.numel() for d in self.net.delta_list())


@dataclass
class WeightDecayChoice:
    """λ and how it was chosen; with leave-one-out also the dual system, its optimum δ* (flat) and L* at that λ."""

    weight_decay: float
    record: dict[str, Any]
    path: ValidationPath | None = None
    system: DualSystem | None = None
    solution: torch.Tensor | None = None
    objective_star: float | None = None


@torch.no_grad()
def build_dual_system(train: TrainingSet, cache: JacobianCache | None) -> tuple[DualSystem, torch.Tensor]:
    """The dual system of the training set at w0 (Jacobians by reverse mode, float64), in the training-set order,
    and the targets ``α·onehot`` of its rows."""
    if cache is not None:  # the rows are stored already: no second Jacobian pass
        targets = train.loss.targets(cache.labels, cache.base.shape[1], torch.float64)
        return DualSystem(cache.jacobian, targets - cache.base.double()), targets
    jacobians, residuals, targets = [], [], []
    for x, y in train.batches():
        base = train.net.apply_to_base(x)
        targets.append(train.loss.targets(y, base.shape[1], torch.float64))
        residuals.append(targets[-1] - base.double())
        with torch.enable_grad():
            jacobians.append(train.net.jacobian(x).double())
    return DualSystem(torch.cat(jacobians), torch.cat(residuals)), torch.cat(targets)


def leave_one_out_refusal(data: Any, num_classes: int) -> str | None:
    """Why leave-one-out cannot choose a penalty on the training samples ``data`` (a class with a single sample:
    leaving it out leaves the class unseen, so every penalty looks alike and the largest wins), or None. Checked in
    the few-shot regime only (at most 50 samples per class on average), where it can happen."""
    if len(data) > 50 * num_classes:
        return None
    counts = torch.bincount(torch.tensor([int(data[i][1]) for i in range(len(data))]), minlength=num_classes)
    fewest = int(counts.min())
    return None if fewest >= 2 else f"a class has {fewest} training sample(s), too few to leave one out"


def _kernel_refusal(train: TrainingSet, selection: WeightDecaySelection) -> str | None:
    """Why the dual system cannot serve the λ choice, or None when it can."""
    if selection.rule == "validation":
        return "weight_decay_selection.rule=validation"
    if (reason := leave_one_out_refusal(train.data, train.num_classes)) is not None:
        return reason
    if not train.loss.constant_curvature:
        return f"loss={train.loss.kind} is not quadratic"
    if train.world_size > 1:
        return "data parallelism (the dual system is built in one process)"
    try:
        check_kernel_size(len(train.data) * train.num_classes, train.params, selection.max_rows,
                          selection.max_memory_gb, "weight_decay=auto by leave-one-out")
    except ValueError as error:
        return str(error)
    return None


def build_jacobian_cache(train: TrainingSet, limit_gb: float | None, solver: Solver
                         ) -> tuple[JacobianCache | None, dict[str, Any]]:
    """J of the training set when it fits ``limit_gb`` (see :mod:`lqf_exp.jacobian_cache`), and the record of it
    (or of why not) for metrics.json."""
    samples, params = len(train.data), train.params
    dtype = train.net.delta_list()[0].dtype
    refusal = jacobian_cache_refusal(samples, train.num_classes, params, dtype, limit_gb, train.world_size,
                                     train.loss.constant_curvature)
    if refusal is None and not solver.uses_jacobian_cache:
        refusal = f"solver={solver.name} does not run on it"
    if refusal is not None:
        log.info("Jacobian cache off: %s; the solve runs through network passes", refusal)
        return None, {"used": False, "why": refusal}
    cache = JacobianCache.build(train.net, train.batches(), samples)
    log.info("Jacobian cache: %d×%d (%.2f GB) in %.1f s; the solve runs on it", samples * train.num_classes, params,
             cache.gigabytes, cache.seconds)
    return cache, {"used": True, "gigabytes": cache.gigabytes, "seconds": cache.seconds,
                   "rows": samples * train.num_classes, "columns": params}


def choose_weight_decay(train: TrainingSet, selection: WeightDecaySelection, cache: JacobianCache | None,
                        head_smoother: Callable[[], torch.Tensor] | None) -> WeightDecayChoice:
    """λ by exact leave-one-out on the dual system (with its optimum at that λ), or the validation path's first λ
    and the path itself. ``head_smoother``: the probe head's hat matrix, refitted in the leave-one-out."""
    refusal = _kernel_refusal(train, selection)
    if refusal is not None:
        path = ValidationPath(list(selection.path), int(selection.patience), float(selection.path_rel_gap),
                              int(selection.path_max_epochs))
        log.info("weight_decay=auto: validation-loss path over %s (%s)", selection.path, refusal)
        return WeightDecayChoice(path.current, {"method": "validation path", "path": list(selection.path),
                                                "why": refusal}, path=path)
    system, targets = build_dual_system(train, cache)
    prior = head_smoother() if head_smoother is not None else None
    choice = system.select_weight_decay(list(selection.grid), targets, prior)
    delta, u = system.solve(choice.weight_decay)
    log.info("weight_decay=auto: λ = %g by exact leave-one-out over %d values (LOO error %.4g)",
             choice.weight_decay, len(choice.grid), min(choice.loo_errors))
    record = {"method": "leave-one-out", "weight_decay": choice.weight_decay, "grid": choice.grid,
              "loo_error": choice.loo_errors, "loo_accuracy": choice.loo_accuracy, "head_refit": prior is not None}
    return WeightDecayChoice(choice.weight_decay, record, system=system, solution=delta,
                             objective_star=system.objective(choice.weight_decay, u))
