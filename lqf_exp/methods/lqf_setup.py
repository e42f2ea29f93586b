"""Setting up an LQF solve: the Jacobian cache, λ for ``weight_decay=auto`` (and parsing the values that may say
``auto``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from lqf_exp.jacobian_cache import JacobianCache, jacobian_cache_refusal
from lqf_exp.solvers import DualSystem, ValidationPath, check_kernel_size

if TYPE_CHECKING:
    from lqf_exp.methods.lqf import LQF

log = logging.getLogger(__name__)

__all__ = ["build_dual_system", "build_jacobian_cache", "choose_weight_decay", "leave_one_out_refusal",
           "parse_weight_decay"]


def parse_weight_decay(value: Any, key: str) -> float | None:
    """``auto`` → None (to be chosen); a number ≥ 0 → float; anything else raises a ValueError naming ``key``."""
    if isinstance(value, str) and value == "auto":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    raise ValueError(f"invalid {key}={value!r}: expected 'auto' or a number >= 0")


@torch.no_grad()
def build_dual_system(module: LQF) -> tuple[DualSystem, torch.Tensor]:
    """The dual system of the training set at w0 (Jacobians by reverse mode, float64), in the training-set order,
    and the targets ``α·onehot`` of its rows."""
    cache = module.jacobian_cache
    if cache is not None:  # the rows are stored already: no second Jacobian pass
        targets = module.loss_fn.targets(cache.labels, cache.base.shape[1], torch.float64)
        return DualSystem(cache.jacobian, targets - cache.base.double()), targets
    jacobians, residuals, targets = [], [], []
    for x, y in module.train_batches():
        base = module.linearized.apply_to_base(x)
        targets.append(module.loss_fn.targets(y, base.shape[1], torch.float64))
        residuals.append(targets[-1] - base.double())
        with torch.enable_grad():
            jacobians.append(module.linearized.jacobian(x).double())
    return DualSystem(torch.cat(jacobians), torch.cat(residuals)), torch.cat(targets)


def leave_one_out_refusal(module: LQF) -> str | None:
    """Why leave-one-out cannot choose a penalty on this training set (a class with a single sample: leaving it out
    leaves the class unseen, so every penalty looks alike and the largest wins), or None. Checked in the few-shot
    regime only (at most 50 samples per class on average), where it can happen."""
    data = module.train_data()
    if len(data) > 50 * module.num_classes:
        return None
    counts = torch.bincount(torch.tensor([int(data[i][1]) for i in range(len(data))]), minlength=module.num_classes)
    fewest = int(counts.min())
    return None if fewest >= 2 else f"a class has {fewest} training sample(s), too few to leave one out"


def _kernel_refusal(module: LQF) -> str | None:
    """Why the dual system cannot serve the λ choice, or None when it can."""
    if (reason := leave_one_out_refusal(module)) is not None:
        return reason
    if not module.loss_fn.constant_curvature:
        return f"loss={module.loss_fn.kind} is not quadratic"
    if module.trainer.world_size > 1:
        return "data parallelism (the dual system is built in one process)"
    rows = len(module.train_data()) * module.num_classes
    params = sum(d.numel() for d in module.linearized.delta_list())
    try:
        check_kernel_size(rows, params, module.selection.max_rows, module.selection.max_memory_gb,
                          "weight_decay=auto by leave-one-out")
    except ValueError as error:
        return str(error)
    return None


def build_jacobian_cache(module: LQF) -> None:
    """Store J of the training set when it fits ``jacobian_cache_gb`` (see :mod:`lqf_exp.jacobian_cache`); record
    why not otherwise."""
    params = sum(d.numel() for d in module.linearized.delta_list())
    samples = len(module.train_data())
    dtype = module.linearized.delta_list()[0].dtype
    refusal = jacobian_cache_refusal(samples, module.num_classes, params, dtype, module.jacobian_cache_gb,
                                     module.trainer.world_size, module.loss_fn.constant_curvature)
    if refusal is None and not module.solver.uses_jacobian_cache:
        refusal = f"solver={module.solver.name} does not run on it"
    if refusal is not None:
        module.cache_record = {"used": False, "why": refusal}
        log.info("Jacobian cache off: %s; the solve runs through network passes", refusal)
        return
    cache = JacobianCache.build(module.linearized, module.train_batches(), samples)
    module.jacobian_cache = cache
    module.cache_record = {"used": True, "gigabytes": cache.gigabytes, "seconds": cache.seconds,
                           "rows": samples * module.num_classes, "columns": params}
    log.info("Jacobian cache: %d×%d (%.2f GB) in %.1f s; the solve runs on it", samples * module.num_classes, params,
             cache.gigabytes, cache.seconds)


def choose_weight_decay(module: LQF) -> None:
    """Set ``module``'s λ by exact leave-one-out on the dual system, or start the validation path."""
    selection = module.selection
    refusal = _kernel_refusal(module)
    if refusal is not None:
        path = ValidationPath(list(selection.path), int(selection.patience), float(selection.path_rel_gap),
                              int(selection.path_max_epochs))
        module.controller.path = path
        module.set_weight_decay(path.current)
        module.selection_record = {"method": "validation path", "path": list(selection.path), "why": refusal}
        log.info("weight_decay=auto: validation-loss path over %s (%s)", selection.path, refusal)
        return
    system, targets = build_dual_system(module)
    prior = module.head_smoother() if module.head_smoother is not None else None
    choice = system.select_weight_decay(list(selection.grid), targets, prior)
    module.set_weight_decay(choice.weight_decay)
    delta, u = system.solve(choice.weight_decay)
    module.controller.objective_star = system.objective(choice.weight_decay, u)
    module.dual_solution = delta  # δ* = Jᵀu: the run takes it instead of iterating toward it
    module.solver.use_dual_system(system)
    module.selection_record = {
        "method": "leave-one-out", "weight_decay": choice.weight_decay, "grid": choice.grid,
        "loo_error": choice.loo_errors, "loo_accuracy": choice.loo_accuracy, "head_refit": prior is not None,
    }
    log.info("weight_decay=auto: λ = %g by exact leave-one-out over %d values (LOO error %.4g)",
             choice.weight_decay, len(choice.grid), min(choice.loo_errors))
