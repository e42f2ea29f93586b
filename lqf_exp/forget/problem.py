"""What is removed from a finished LQF run and the problem that remains: the indices (checked by the same code as
``data.drop``), the remaining samples, the head refitted without them (``--refit-head``), and the remaining problem
as an objective or as a dual system."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from lqf_exp.data.base import kept_indices
from lqf_exp.data.torchvision_sets import labels_of
from lqf_exp.influence import FinishedRun
from lqf_exp.jacobian_cache import JacobianCache, jacobian_cache_refusal
from lqf_exp.methods.lqf_setup import TrainingSet, build_dual_system
from lqf_exp.solvers import DualSystem, LQFObjective

log = logging.getLogger(__name__)

__all__ = ["Removal", "RemainingProblem", "class_positions", "read_removal", "refit_head"]


@dataclass
class Removal:
    """The training-set positions removed (``dropped``, as listed) and those kept (in order), with the index file's
    text (copied into the new run) and, for ``--drop-class``, the class."""

    dropped: list[int]
    kept: list[int]
    text: str
    drop_class: int | None = None


def class_positions(dataset: Dataset, k: int) -> list[int]:
    """The positions in ``dataset`` of its samples of class ``k``."""
    return [i for i, label in enumerate(labels_of(dataset)) if label == k]


def read_removal(run: FinishedRun, drop: Path | None, drop_class: int | None) -> Removal:
    """The removal asked for, checked before anything is computed or written.

    ``drop``: an index file as ``data.drop`` reads it (:func:`lqf_exp.data.base.kept_indices`: one integer per line,
    in range, no duplicate, not every sample). ``drop_class``: every training sample of that class (the same checks,
    on the list it gives).
    """
    train = run.datamodule.train_dataset
    size = len(train)  # type: ignore[arg-type]
    if (drop is None) == (drop_class is None):
        raise ValueError("give exactly one of --drop <index file> and --drop-class <k>")
    if drop is not None:
        if not drop.is_file():
            raise FileNotFoundError(f"--drop {str(drop)!r}: no such file (one training-set index per line)")
        text = drop.read_text()
        try:
            kept = kept_indices(drop, size)
        except ValueError as error:
            raise ValueError(f"--drop: {error}") from None
        return Removal([int(i) for i in text.split()], kept, text)
    classes = run.datamodule.num_classes
    assert drop_class is not None
    if not 0 <= drop_class < classes:
        raise ValueError(f"--drop-class {drop_class}: the run's classes are 0..{classes - 1} "
                         f"({', '.join(run.datamodule.class_names)})")
    dropped = class_positions(train, drop_class)
    if not dropped:
        raise ValueError(f"--drop-class {drop_class}: the run's training set has no sample of that class")
    text = "".join(f"{i}\n" for i in dropped)
    with tempfile.TemporaryDirectory() as scratch:  # the same checks as an index file (it cannot drop everything)
        listed = Path(scratch) / f"class{drop_class}.txt"
        listed.write_text(text)
        try:
            kept = kept_indices(listed, size)
        except ValueError as error:
            raise ValueError(f"--drop-class {drop_class}: {str(error).replace(str(listed), 'its list')}") from None
    return Removal(dropped, kept, text, drop_class)


def _loader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def refit_head(run: FinishedRun, kept: Dataset) -> dict[str, Any]:
    """Refit the probe head of ``run.module`` on the kept samples alone, as a run on them would fit it
    (:meth:`lqf_exp.methods.LQF.initialize_head` with its choices: ``head_init_l2`` given or by leave-one-out, the
    validation loss where a class has fewer than two samples, the first ``head_init_batches`` batches); returns the
    head record. Without it, S stays in w0 through the head, and hence in every Jacobian."""
    module, datamodule = run.module, run.datamodule
    if module.head_init != "probe":
        raise ValueError(f"--refit-head refits a probe head; {run.run_dir} has method.head_init={module.head_init!r}")
    batches: Iterable[Any] = _loader(kept, datamodule.eval_batch_size)
    if module.head_init_batches is not None:
        batches = [b for _, b in zip(range(module.head_init_batches), batches, strict=False)]
    val = _loader(datamodule.val_dataset, datamodule.eval_batch_size)
    module.initialize_head(batches, train_data=kept, val_loader=val)
    return dict(module.head_record)


@dataclass
class RemainingProblem:
    """L' of the kept samples at the run's λ (see :mod:`lqf_exp.forget.core`), in the run's dtype."""

    run: FinishedRun
    kept: Dataset
    cache_limit_gb: float | None
    cache_record: dict[str, Any] = field(default_factory=dict)
    _objective: LQFObjective | None = None

    @classmethod
    def of(cls, run: FinishedRun, removal: Removal, cache_limit_gb: float | None) -> RemainingProblem:
        return cls(run, Subset(run.datamodule.train_dataset, removal.kept), cache_limit_gb)

    @property
    def size(self) -> int:
        return len(self.kept)  # type: ignore[arg-type]

    @property
    def params(self) -> int:
        return sum(d.numel() for d in self.run.module.linearized.delta_list())

    def batches(self) -> Iterable[tuple[Tensor, Tensor]]:
        return iter(_loader(self.kept, self.run.datamodule.eval_batch_size))

    def training_set(self) -> TrainingSet:
        module = self.run.module
        return TrainingSet(module.linearized, module.loss_fn, self.kept, self.batches, module.num_classes, 1)

    def dual_system(self) -> DualSystem:
        """The dual system of the kept rows (float64 Jacobians; N'·C × N'·C)."""
        return build_dual_system(self.training_set(), None)[0]

    def objective(self) -> LQFObjective:
        """The objective L' with the run's K-FAC inverse as preconditioner, on a Jacobian cache of the kept samples
        when it fits ``cache_limit_gb`` (the run's ``method.jacobian_cache_gb``), else through network passes."""
        if self._objective is not None:
            return self._objective
        module = self.run.module
        net = module.linearized
        objective = LQFObjective(net, module.loss_fn, self.run.weight_decay)
        objective.attach(self.run.kfac)
        dtype = net.delta_list()[0].dtype
        refusal = jacobian_cache_refusal(self.size, module.num_classes, self.params, dtype, self.cache_limit_gb, 1,
                                         module.loss_fn.constant_curvature)
        if refusal is None:
            cache = JacobianCache.build(net, self.batches(), self.size)
            objective.attach_cache(cache)
            self.cache_record = {"used": True, "gigabytes": cache.gigabytes, "seconds": round(cache.seconds, 2)}
        else:
            self.cache_record = {"used": False, "why": refusal}
        self._objective = objective
        return objective

    def flat_delta(self) -> Tensor:
        """The run's δ* (flat, float64)."""
        return torch.cat([d.detach().reshape(-1) for d in self.run.module.linearized.delta_list()]).double()
