"""Lightning callback that preconditions the gradients of a method's curvature targets with damped K-FAC or EKFAC.

The math lives in :class:`~lqf_exp.precond.operator.KFACOperator`; this module only decides which batches it sees
and when, and rewrites ``.grad`` with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DistributedSampler

from lqf_exp.precond.inverse import KroneckerInverse, precondition_layer
from lqf_exp.precond.operator import Corrections, Factors, KFACOperator, operator_options


def _split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, list | tuple):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _splits_global_batches(loader: Any) -> bool:
    """True for a loader whose ranks split every global batch (lqf_exp.data.distributed.GlobalBatchShard)."""
    return bool(getattr(getattr(loader, "batch_sampler", None), "splits_global_batches", False))


class _Sized:
    """Batches with a known count, so that the operator's progress bar shows a total (tqdm reads ``len``)."""

    def __init__(self, batches: Iterable[Any], count: int) -> None:
        self.batches, self.count = batches, count

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def __len__(self) -> int:
        return self.count


class KFACPreconditioner(pl.Callback):
    """Damped K-FAC ``(G ⊗ A + γI)⁻¹`` for the layers of ``pl_module.curvature_targets()``.

    ``γ = damping + targets.damping_offset`` (the λ of the method's ``(λ/2)‖δ‖²``). Factors come from
    ``num_batches`` batches of ``trainer.datamodule.train_dataloader()`` at fit start (sharded across ranks and
    all-reduced under DDP), with the output-space curvature of ``targets.loss``. Methods that step their own
    parameters (``targets.attach``: LQF's solvers) receive the :class:`KFACOperator` (``self.operator``) and call its
    ``precondition``; for the others the gradients of the targets are replaced by the preconditioned ones before
    every optimizer step, and if the curvature is not constant the factors are recomputed every ``update_every``
    optimizer steps from the training batches of the ``min(num_batches, update_every)`` steps that precede the
    refresh. Gradients of trainable tensors that are not targets are left as they are. ``save_factors`` puts the
    factors in checkpoints (else they are recomputed on resume: ~590 MB of factors for resnet50).

    ``eigenvalue_correction`` (EKFAC): after each factor computation, one more pass over the same batches replaces
    the eigenvalues ``λ_G λ_Aᵀ`` by the exact diagonal of the curvature in the Kronecker eigenbasis
    (:mod:`lqf_exp.precond.ekfac`). The corrections, with the eigenbases they belong to, are checkpointed with the
    factors.
    """

    def __init__(
        self,
        fisher_type: str = "type2",
        mc_samples: int = 1,
        damping: float = 1e-3,
        num_batches: int = 10,
        update_every: int = 100,
        kfac_approx: str = "expand",
        seed: int = 0,
        save_factors: bool = True,
        eigenvalue_correction: bool = False,
    ) -> None:
        super().__init__()
        # checked now, not when the operator is built at fit start
        self.options = operator_options(fisher_type, mc_samples, kfac_approx, damping, eigenvalue_correction)
        for name, value in (("num_batches", num_batches), ("update_every", update_every)):
            if int(value) < 1:
                raise ValueError(f"precond.{name} must be >= 1, got {value}")
        self.fisher_type, self.kfac_approx, self.seed = fisher_type, kfac_approx, int(seed)
        self.num_batches, self.update_every = int(num_batches), int(update_every)
        self.eigenvalue_correction, self.save_factors = eigenvalue_correction, bool(save_factors)
        self.operator: KFACOperator | None = None  # built at fit start, when the targets are known
        self.steps = 0  # optimizer steps taken
        self._restored: dict[str, Any] | None = None  # a checkpoint's state that arrived before the operator

    # -- the operator's state, readable before it exists (restored, or empty) --------------------------------------
    def _view(self, key: str, default: Any) -> Any:
        return getattr(self.operator, key) if self.operator is not None else (self._restored or {}).get(key, default)

    @property
    def factors(self) -> Factors | None:
        return self._view("factors", None)

    @property
    def corrections(self) -> Corrections | None:
        return self._view("corrections", None)

    @property
    def inverses(self) -> dict[str, KroneckerInverse]:
        return self._view("inverses", {})

    @property
    def stats(self) -> dict[str, float]:
        return self._view("stats", {})

    @property
    def num_updates(self) -> int:
        """Factor computations (1 = only the initial one)."""
        return int(self._view("num_updates", 0))

    # -- batches ------------------------------------------------------------------------------------------------
    def _generator_seed(self, trainer: pl.Trainer) -> int:
        """The MC seed of this rank and factor computation."""
        return self.seed + 7919 * trainer.global_rank + 104729 * self.num_updates

    def _local_batches(self, trainer: pl.Trainer) -> Iterator[Any]:
        """This rank's share of the first ``num_batches`` batches of a fresh train loader."""
        if trainer.datamodule is None:
            raise RuntimeError("KFACPreconditioner needs trainer.fit(..., datamodule=...) to read curvature batches")
        loader = trainer.datamodule.train_dataloader()
        world, rank = max(1, trainer.world_size), trainer.global_rank
        if _splits_global_batches(loader):  # batch i is this rank's share of global batch i: take them all
            yield from (b for _, b in zip(range(self._batches(trainer)), loader, strict=False))
            return
        if isinstance(getattr(loader, "sampler", None), DistributedSampler):  # already sharded by the loader
            yield from (b for _, b in zip(range(math.ceil(self._batches(trainer) / world)), loader, strict=False))
            return
        for i, batch in zip(range(self._batches(trainer)), loader, strict=False):
            if i % world == rank:
                yield batch

    def _local_count(self, trainer: pl.Trainer) -> int:
        """How many batches :meth:`_local_batches` yields (the progress bar's total; a new loader reads no data)."""
        loader = trainer.datamodule.train_dataloader() if trainer.datamodule is not None else None
        if _splits_global_batches(loader):
            return self._batches(trainer)
        return math.ceil(self._batches(trainer) / max(1, trainer.world_size))

    def _batches(self, trainer: pl.Trainer) -> int:
        """``num_batches``, capped by an integer ``limit_train_batches`` (a smoke run should not estimate more)."""
        limit = getattr(trainer, "limit_train_batches", None)
        return min(self.num_batches, limit) if isinstance(limit, int) and limit > 0 else self.num_batches

    # -- Lightning hooks --------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        targets = pl_module.curvature_targets()
        if self.operator is None:
            self.operator = KFACOperator(targets, **self.options)
        else:  # a second fit with this callback
            self.operator.retarget(targets)
        if self._restored is not None:
            self.operator.load_state_dict(self._restored)
            self._restored = None
        if self.operator.factors is not None:  # restored from a checkpoint: no recomputation
            self.operator.invert()
        else:
            batches = _Sized((_split_batch(b) for b in self._local_batches(trainer)), self._local_count(trainer))
            self.operator.estimate(batches, self._generator_seed(trainer), progress=trainer.is_global_zero)
            self._report(trainer)
        self._attach()

    def _report(self, trainer: pl.Trainer) -> None:
        stats = self.stats
        metrics = {"precond/factor_seconds": stats["seconds"], "precond/factor_samples": float(stats["samples"])}
        message = (f"K-FAC ({self.fisher_type}, {self.kfac_approx}): factors of {len(self.factors or {})} layers "
                   f"from {stats['samples']} samples in {stats['seconds']:.2f}s")
        if self.eigenvalue_correction:
            metrics["precond/correction_seconds"] = stats["correction_seconds"]
            message += f"; EKFAC eigenvalues in {stats['correction_seconds']:.2f}s"
        rank_zero_info(message)
        for logger in trainer.loggers:  # self.log is not allowed in on_fit_start
            logger.log_metrics(metrics, step=trainer.global_step)

    def _attach(self) -> None:
        if self.operator is not None and self.operator.targets.attach is not None:
            self.operator.targets.attach(self.operator)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        operator = self.operator
        if operator is None or operator.targets.attach is not None or operator.targets.constant or self.steps == 0:
            return
        window = min(self.num_batches, self.update_every)
        if (-self.steps) % self.update_every < window:  # one of the steps just before a refresh
            if not operator.accumulating:
                operator.begin(self._generator_seed(trainer))
            operator.accumulate(*_split_batch(batch))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        operator = self.operator
        if operator is None or operator.factors is None or operator.targets.attach is not None:
            return
        refresh = not operator.targets.constant and self.steps > 0 and self.steps % self.update_every == 0
        if refresh and operator.accumulating:
            operator.finish(progress=trainer.is_global_zero)
        inverses = operator.current_inverses()
        for name, (weight, bias) in operator.targets.layers.items():
            precondition_layer(inverses[name], weight, bias)
        self.steps += 1

    # -- checkpointing: with save_factors a resumed run preconditions with the same matrices (EKFAC: and the same
    # corrections, in the eigenbases they belong to); without, it recomputes them at fit start from the resumed weights.
    def state_dict(self) -> dict[str, Any]:
        if self.operator is not None:
            state = self.operator.state_dict() if self.save_factors else {
                "num_updates": self.operator.num_updates, "stats": dict(self.operator.stats)}
        else:
            state = dict(self._restored or {})
        if not self.save_factors:
            state.update(factors=None, corrections=None)
        return {"factors": None, "corrections": None, "num_updates": 0, "stats": {}, **state, "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict.get("steps", 0))
        state = {key: value for key, value in state_dict.items() if key != "steps"}
        if self.operator is not None:
            self.operator.load_state_dict(state)
        else:
            self._restored = state
