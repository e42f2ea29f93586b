"""``forget``: remove training samples from a finished LQF run and write the edited run beside it (see
:mod:`lqf_exp.forget`). Every check of the input runs before anything is computed or written."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from lqf_exp.builders import build
from lqf_exp.data.base import kept_indices
from lqf_exp.delta_layout import copy_flat_
from lqf_exp.influence import FinishedRun, load_finished_run
from lqf_exp.influence.run_dir import scores
from lqf_exp.results import changed_predictions, read_test_predictions, write_test_predictions
from lqf_exp.solvers import check_kernel_size

from .core import Solution, conjugate_gradient_from, exact_solution, gradient_norm
from .outputs import split_metrics, staged_directory, write_run
from .problem import RemainingProblem, Removal, class_positions, read_removal, refit_head

log = logging.getLogger(__name__)

__all__ = ["METHODS", "ForgetOptions", "forget"]

METHODS = ("auto", "exact", "solve", "retrain")


@dataclass
class ForgetOptions:
    """How to forget. ``method``: ``exact`` (dual system), ``solve`` (CG from the run's δ*), ``retrain`` (CG from
    0, the reference) or ``auto`` (exact where the dual system fits ``max_rows``/``max_memory_gb``, else solve).
    ``tol``: solve stops once ‖δ − δ_ref‖ ≤ tol·‖δ* − δ_ref‖ is certified (:func:`conjugate_gradient_from`);
    ``retrain_tol``: retrain at ‖∇L'‖ ≤ retrain_tol·‖∇L'(0)‖, by
    default as tight as the run's precision allows a reference to be: 1e-6 in float32 (float32 products stall
    CG near there), 1e-10 in float64 (at 1e-6 the δ of an ill-conditioned problem is still ~1e-5 off)."""

    method: str = "auto"
    refit_head: bool = False
    tol: float = 1e-2
    retrain_tol: float | None = None
    max_iter: int = 2000
    sketch_rank: int = 512  # digits, 100 removed: 416 / 235 / 187 iterations at rank 128 / 512 / 1024; 512 fastest
    max_rows: int = 6000
    max_memory_gb: float = 4.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r}: valid methods are {', '.join(METHODS)}")
        for name in ("tol", "retrain_tol"):
            if getattr(self, name) is not None and not 0 < getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: must lie in (0, 1)")
        if self.max_iter < 1 or self.sketch_rank < 0:
            raise ValueError(f"--max-iter must be >= 1 and --sketch-rank >= 0, got {self.max_iter}, {self.sketch_rank}")


def retrain_tolerance(options: ForgetOptions, dtype: torch.dtype) -> float:
    if options.retrain_tol is not None:
        return options.retrain_tol
    return 1e-10 if dtype == torch.float64 else 1e-6


def _resolve_method(options: ForgetOptions, rows: int, params: int) -> str:
    if options.method in ("solve", "retrain"):
        return options.method
    try:
        check_kernel_size(rows, params, options.max_rows, options.max_memory_gb, "forget --method exact")
    except ValueError as error:
        if options.method == "exact":
            raise ValueError(f"{str(error).split('. Use')[0]}. Use --method solve, or raise --max-rows / "
                             "--max-memory-gb if the machine has the memory") from None
        return "solve"
    return "exact"


def _combined_drop(run: FinishedRun, removal: Removal) -> str | None:
    """For a run that had ``data.drop`` already (a summarization cell, an earlier forgetting): the index file of
    both removals, relative to the training set before any drop, for the new run's ``data.drop``; else None."""
    earlier = run.cfg.data.get("drop")
    if earlier is None:
        return None
    path = Path(earlier)
    if not path.is_file():
        raise FileNotFoundError(f"{run.run_dir} was run with data.drop={earlier!r}, which no longer exists: the new "
                                "run's data.drop cannot be composed")
    undropped = build(run.cfg.data, drop=None)
    undropped.setup("fit")
    base = kept_indices(path, len(undropped.train_dataset))
    indices = [int(i) for i in path.read_text().split()] + [base[i] for i in removal.dropped]
    return "".join(f"{i}\n" for i in indices)


def _default_out(run_dir: Path, drop: Path | None, removal: Removal, method: str, refit: bool) -> Path:
    tag = drop.stem if drop is not None else f"class{removal.drop_class}"
    return run_dir.parent / f"{run_dir.name}-forget-{tag}-{method}{'-refit' if refit else ''}"


def _remains(run: FinishedRun, refit: bool) -> list[str]:
    """What of the removed samples the edited run still carries (the README's list, per run)."""
    notes = [] if refit else ["the probe head of w0 (fitted with them), hence every Jacobian J at w0"]
    if (run.metrics.get("solver") or {}).get("weight_decay_selection", {}).get("method"):
        notes.append(f"λ = {run.weight_decay:g}, chosen by weight_decay=auto with them")
    if run.kfac is not None:
        notes.append("the K-FAC factors of the checkpoint (estimated with them; only a preconditioner: the edited δ "
                     "is the optimum of the remaining problem whatever it is)")
    return notes


def _solve(problem: RemainingProblem, method: str, options: ForgetOptions, start: torch.Tensor
           ) -> tuple[Solution, dict[str, float]]:
    """The edited δ and the gradient norms of the new objective at it, at the run's δ* and at 0."""
    λ = problem.run.weight_decay
    if method == "exact":
        system = problem.dual_system()
        solution = exact_solution(system, λ)
        norms = {name: float(system.gradient(λ, d).norm())
                 for name, d in (("edited", solution.delta), ("run", start), ("zero", torch.zeros_like(start)))}
        return solution, norms
    objective = problem.objective()
    if method == "solve":
        solution = conjugate_gradient_from(objective, problem.batches, start, options.max_iter, error=options.tol,
                                           sketch_rank=options.sketch_rank)
    else:
        solution = conjugate_gradient_from(objective, problem.batches, 0 * start, options.max_iter,
                                           tol=retrain_tolerance(options, objective.deltas[0].dtype),
                                           sketch_rank=options.sketch_rank)
    norms = {name: gradient_norm(objective, problem.batches, d)
             for name, d in (("run", start), ("zero", torch.zeros_like(start)), ("edited", solution.delta))}
    return solution, norms


def forget(run_dir: Path, drop: Path | None = None, drop_class: int | None = None, out: Path | None = None,
           options: ForgetOptions | None = None) -> tuple[Path, dict[str, Any]]:
    """Remove the samples of ``drop`` (an index file) or of class ``drop_class`` from the finished LQF run in
    ``run_dir``; write the edited run to ``out``. Returns ``(out, metrics.json payload)``."""
    options = options or ForgetOptions()
    started = time.perf_counter()
    run = load_finished_run(run_dir, native_precision=True)
    removal = read_removal(run, drop, drop_class)
    problem = RemainingProblem.of(run, removal, run.cfg.method.get("jacobian_cache_gb"))
    method = _resolve_method(options, problem.size * run.datamodule.num_classes, problem.params)
    out = Path(out) if out is not None else _default_out(Path(run_dir), drop, removal, method, options.refit_head)
    if out.exists():
        raise FileExistsError(f"--out {str(out)!r} exists already; the edited run goes to a new directory")
    data_drop = _combined_drop(run, removal)
    module, dm = run.module, run.datamodule
    removed = Subset(dm.train_dataset, removal.dropped)
    k = removal.drop_class
    # Before: the run's recorded accuracies, plus what it does not record (the removed samples, class k: scored on
    # the test images of class k alone, the rest of the test set does not change its accuracy).
    before_class = None if k is None else scores(module, Subset(dm.test_dataset, class_positions(dm.test_dataset, k)),
                                                 dm.eval_batch_size)
    before = {"val/acc": run.metrics["metrics"].get("val/acc"), "test/acc": run.metrics["metrics"].get("test/acc"),
              "removed/acc": scores(module, removed, dm.eval_batch_size).acc}
    start = problem.flat_delta()
    if options.refit_head:
        refit_head(run, problem.kept)
    solution, norms = _solve(problem, method, options, start)
    copy_flat_(solution.delta, module.linearized.delta_list())
    val, test, gone = (scores(module, d, dm.eval_batch_size) for d in (dm.val_dataset, dm.test_dataset, removed))
    after = {"val/acc": val.acc, "test/acc": test.acc, "removed/acc": gone.acc}
    run_predictions = read_test_predictions(Path(run_dir))
    if run_predictions is not None:  # an equal accuracy is not the same predictions
        after["test/changed_predictions"] = changed_predictions(run_predictions, test.predictions.tolist())
    if k is not None:
        assert before_class is not None
        for entry, scored in ((before, before_class), (after, test)):
            entry[f"test/acc_class{k}"], entry[f"test/right_class{k}"] = scored.class_acc(k), scored.class_counts(k)
    dtype = module.linearized.delta_list()[0].dtype
    certificate = {
        "objective": f"mean over the {problem.size} remaining samples + (λ/2)‖δ‖², λ = {run.weight_decay:g}",
        "grad_norm": norms["edited"], "grad_norm_at_run_delta": norms["run"], "grad_norm_at_zero": norms["zero"],
        "relative_to_run_delta": norms["edited"] / norms["run"] if norms["run"] > 0 else 0.0,
        "relative_to_zero": norms["edited"] / norms["zero"] if norms["zero"] > 0 else 0.0,
        # λ bounds the curvature of L' from below: the distance to the exact optimum, certified.
        "distance_to_optimum_bound": norms["edited"] / run.weight_decay,
        "distance_moved": float((solution.delta - start).norm()),
        "precision": "float64 solve" + ("" if method == "exact" else " and reductions")
        + f", network and Jacobian products in {str(dtype).replace('torch.', '')}",
    }
    record = {
        "method": method, "requested_method": options.method, "refit_head": options.refit_head,
        "removed": len(removal.dropped), "train_size": problem.size, "source_run": str(Path(run_dir).resolve()),
        "drop_file": None if drop is None else str(drop), "drop_class": removal.drop_class,
        "weight_decay": run.weight_decay, "iterations": solution.iterations, "converged": solution.converged,
        "tolerance": {"exact": None, "solve": options.tol,
                      "retrain": retrain_tolerance(options, dtype)}[method],
        "sketch": solution.sketch, "jacobian_cache": problem.cache_record, "solve_seconds": round(solution.seconds, 2),
        "before": before, "after": after, "certificate": certificate,
        "remains_of_removed": _remains(run, options.refit_head), "head": dict(module.head_record),
    }
    solver = {"status": "converged" if solution.converged else "capped", "exact": method == "exact",
              "epochs": solution.iterations, "in_memory": bool(problem.cache_record.get("used")),
              "grad_ratio": certificate["relative_to_zero"], "weight_decay": run.weight_decay,
              **dict(module.head_record)}
    record["seconds"] = round(time.perf_counter() - started, 2)
    with staged_directory(out) as stage:
        payload = write_run(stage, out, run, solution.delta, removal.text, data_drop,
                            split_metrics(val, test), record, solver)
        write_test_predictions(stage, test.labels.tolist(), test.predictions.tolist())
    log.info("forget: %s written in %.1f s", out, time.perf_counter() - started)
    return out, payload
