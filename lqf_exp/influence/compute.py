"""Influence of every training sample of a finished LQF run on its validation and test predictions, by K-FAC
and/or exactly, with timings."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lqf_exp.delta_layout import flat_size
from lqf_exp.solvers import check_kernel_size

from .core import Influence, LeaveOneOut, exact_leave_one_out, preconditioned_leave_one_out
from .operators import jacobian_chunks, kfac_rows
from .run_dir import FinishedRun

log = logging.getLogger(__name__)

__all__ = ["METHODS", "RunInfluence", "compute_influence"]

METHODS = ("kfac", "exact", "both")


@dataclass
class RunInfluence:
    """Per method: the influence on the validation inputs (F-SI) and on the test inputs, and the seconds taken
    (each method's leave-one-out plus the shared evaluation of the changes)."""

    val: dict[str, Influence] = field(default_factory=dict)
    test: dict[str, Influence] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    yield from DataLoader(dataset, batch_size=batch_size, shuffle=False)


def compute_influence(run: FinishedRun, method: str = "kfac", chunk: int = 64, max_rows: int = 16000,
                      max_memory_gb: float = 16.0) -> RunInfluence:
    """``method``: ``kfac`` (the run's K-FAC inverse), ``exact`` (the dual system; refuses problems whose NC×NC
    kernel or Jacobians exceed ``max_rows`` / ``max_memory_gb``, naming the sizes) or ``both``."""
    if method not in METHODS:
        raise ValueError(f"unknown influence method {method!r}; valid: {', '.join(METHODS)}")
    net, loss = run.module.linearized, run.module.loss_fn
    dm = run.datamodule
    train, val, test = dm.train_dataset, dm.val_dataset, dm.test_dataset
    N, params = len(train), flat_size(net.delta_list())  # type: ignore[arg-type]
    wanted = ("kfac", "exact") if method == "both" else (method,)
    if "kfac" in wanted and run.kfac is None:
        raise ValueError(f"{run.run_dir} has no K-FAC state (precond={run.cfg.precond.get('name')}); use "
                         "--method exact")
    if "exact" in wanted:
        try:
            check_kernel_size(N * dm.num_classes, params, max_rows, max_memory_gb, "exact influence")
        except ValueError as error:
            raise ValueError(f"{str(error).split('. Use')[0]}. Use --method kfac, or raise --max-rows / "
                             "--max-memory-gb if the machine has the memory") from None
    loos: dict[str, LeaveOneOut] = {}
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    chunks = jacobian_chunks(net, loss, _batches(train, chunk))
    if "exact" in wanted:  # the exact solve holds every training Jacobian anyway: compute them once for both
        chunks = list(chunks)  # type: ignore[assignment]
    for name in wanted:
        if name == "kfac":
            assert run.kfac is not None
            loos[name] = preconditioned_leave_one_out(chunks, N, kfac_rows(run.kfac, net))
        else:
            parts = list(chunks)
            loos[name] = exact_leave_one_out(torch.cat([j for j, _ in parts]), torch.cat([e for _, e in parts]),
                                             run.weight_decay, gram_dtype=torch.float64)
        seconds[name] = time.perf_counter() - started  # the first method also pays for the training Jacobians
        started = time.perf_counter()
        log.info("%s leave-one-out of %d training samples: %.1f s", name, N, seconds[name])
    del chunks
    # The evaluation inputs' Jacobians are used chunk by chunk and never held together (fmnist_target: 5050 × 5
    # rows of 77k entries would be 7.8 GB).
    started = time.perf_counter()
    result = RunInfluence()
    for target, dataset in ((result.val, val), (result.test, test)):
        changes: dict[str, list[Tensor]] = {name: [] for name in wanted}
        for x, _ in _batches(dataset, chunk):
            jacobian = net.jacobian(x).detach()
            for name in wanted:
                changes[name].append(loos[name].change(jacobian))
        for name in wanted:
            loo = loos[name]
            target[name] = Influence(torch.cat(changes[name], dim=1), loo.leverage, loo.residual, loo.loo_residual)
    evaluation = time.perf_counter() - started
    result.seconds = {name: round(seconds[name] + evaluation, 2) for name in wanted}  # evaluation shared
    log.info("changes of %d validation + %d test predictions: %.1f s", len(val), len(test), evaluation)
    return result
