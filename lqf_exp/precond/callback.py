"""Lightning callback that preconditions the gradients of a method's curvature targets with damped K-FAC or EKFAC."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from lqf_exp.curvature import CurvatureTargets, LayerTensors
from lqf_exp.precond.ekfac import EigenvalueCorrection
from lqf_exp.precond.factors import FISHER_TYPES, KFAC_APPROXES, FactorAccumulator, _check_choice
from lqf_exp.precond.inverse import KroneckerInverse, check_damping, join_layer, precondition_layer, split_layer

Factors = dict[str, tuple[Tensor, Tensor]]
Corrections = dict[str, tuple[Tensor, Tensor, Tensor]]  # layer -> (Q_A, Q_G, corrected eigenvalues s)


@contextmanager
def _eval_mode(network: nn.Module) -> Iterator[None]:
    """Evaluate the curvature in eval mode (no BN statistics update, no dropout), then restore every module."""
    modes = {m: m.training for m in network.modules()}
    network.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, list | tuple):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


class KFACPreconditioner(pl.Callback):
    """Damped K-FAC ``(G ⊗ A + γI)⁻¹`` for the layers of ``pl_module.curvature_targets()``.

    ``γ = damping + targets.damping_offset`` (the λ of the method's ``(λ/2)‖δ‖²``). Factors come from
    ``num_batches`` batches of ``trainer.datamodule.train_dataloader()`` at fit start (sharded across ranks and
    all-reduced under DDP), with the output-space curvature of ``targets.loss``. Methods that step their own
    parameters (``targets.attach``: LQF's solvers) receive this object and call :meth:`precondition`; for the others
    the gradients of the targets are replaced by the preconditioned ones before every optimizer step, and if the
    curvature is not constant the factors are recomputed every ``update_every`` optimizer steps from the training
    batches of the ``min(num_batches, update_every)`` steps that precede the refresh. Gradients of trainable
    tensors that are not targets are left as they are. ``save_factors`` puts the factors in checkpoints (else they
    are recomputed on resume).

    ``eigenvalue_correction`` (EKFAC): after each factor computation, one more pass over the same batches replaces
    the eigenvalues ``λ_G λ_Aᵀ`` by the exact diagonal of the curvature in the Kronecker eigenbasis
    (:mod:`lqf_exp.precond.ekfac`); the batches are held until then. The corrections, with the eigenbases they
    belong to, are checkpointed with the factors.
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
        _check_choice("fisher_type", fisher_type, FISHER_TYPES)
        _check_choice("kfac_approx", kfac_approx, KFAC_APPROXES)
        for name, value in (("mc_samples", mc_samples), ("num_batches", num_batches), ("update_every", update_every)):
            if int(value) < 1:
                raise ValueError(f"precond.{name} must be >= 1, got {value}")
        self.fisher_type, self.kfac_approx, self.seed = fisher_type, kfac_approx, int(seed)
        self.mc_samples, self.num_batches, self.update_every = int(mc_samples), int(num_batches), int(update_every)
        self.damping = check_damping(damping)
        self.save_factors = bool(save_factors)
        if not isinstance(eigenvalue_correction, bool):
            raise ValueError(f"precond.eigenvalue_correction must be true or false, got {eigenvalue_correction!r}")
        self.eigenvalue_correction = eigenvalue_correction
        self.factors: Factors | None = None
        self.corrections: Corrections | None = None
        self.inverses: dict[str, KroneckerInverse] = {}
        self.stats: dict[str, float] = {}
        self.steps = 0  # optimizer steps taken
        self.num_updates = 0  # factor computations (1 = only the initial one)
        self._targets: CurvatureTargets | None = None
        self._acc: FactorAccumulator | None = None
        self._batch_cache: list[Any] = []  # the factor batches, for the eigenvalue correction
        self._stale = False

    # -- helpers ----------------------------------------------------------------------------------------------
    def gamma(self) -> float:
        """Total damping: ``damping`` plus the targets' ``damping_offset`` (the method's λ toward w0)."""
        assert self._targets is not None
        return check_damping(self.damping + float(self._targets.damping_offset))

    def _generator(self, trainer: pl.Trainer, stream: int) -> torch.Generator:
        """The MC-sampling generator of this rank, update and stream (0: factors, 1: eigenvalue correction)."""
        assert self._targets is not None
        generator = torch.Generator(device=next(iter(self._targets.layers.values()))[0].device)
        generator.manual_seed(self.seed + 7919 * trainer.global_rank + 104729 * self.num_updates + 15485863 * stream)
        return generator

    def _layer_bias(self) -> dict[str, bool]:
        assert self._targets is not None
        return {n: b is not None for n, (_, b) in self._targets.layers.items()}

    def _new_accumulator(self, trainer: pl.Trainer) -> FactorAccumulator:
        targets = self._targets
        assert targets is not None
        return FactorAccumulator(
            targets.network, self._layer_bias(), targets.loss, fisher_type=self.fisher_type,
            mc_samples=self.mc_samples, kfac_approx=self.kfac_approx, generator=self._generator(trainer, 0),
        )

    def _accumulate(self, pl_module: pl.LightningModule, batch: Any,
                    acc: FactorAccumulator | EigenvalueCorrection | None = None) -> int:
        """Add ``batch`` to ``acc`` (default: the factor accumulator, which also keeps it for the correction)."""
        assert self._targets is not None
        if acc is None:
            assert self._acc is not None
            acc = self._acc
            if self.eigenvalue_correction:
                self._batch_cache.append(batch)
        x, y = _split_batch(batch)
        x = x.to(pl_module.device)
        y = None if y is None else y.to(pl_module.device)
        with _eval_mode(self._targets.network):
            return acc.accumulate(x, y, self._targets.outputs_fn)

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """All-reduce the accumulated sums, normalize, (re)build the inverses, and correct their eigenvalues."""
        self._finish_factors()
        if self.eigenvalue_correction:
            self._correct(trainer, pl_module)

    def _finish_factors(self) -> None:
        assert self._acc is not None
        self._acc.all_reduce()
        dtype = next(iter(self._targets.layers.values()))[0].dtype  # type: ignore[union-attr]
        self.factors = self._acc.finalize("mean", dtype=dtype)
        self.corrections = None  # they belonged to the previous factors' eigenbases
        self.stats["samples"] = self._acc.count
        self._acc = None
        self.num_updates += 1
        self.invert()

    def _correct(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """EKFAC: the exact curvature diagonal in the current inverses' eigenbases, over the factors' batches."""
        assert self._targets is not None
        start = time.perf_counter()
        bases = {name: (inv.Q_A, inv.Q_G) for name, inv in self.inverses.items()}
        acc = EigenvalueCorrection(self._targets.network, self._layer_bias(), self._targets.loss, bases,
                                   fisher_type=self.fisher_type, mc_samples=self.mc_samples,
                                   generator=self._generator(trainer, 1))
        batches, self._batch_cache = self._batch_cache, []
        for batch in tqdm(batches, desc="EKFAC eigenvalues", disable=not trainer.is_global_zero, leave=False):
            self._accumulate(pl_module, batch, acc)
        acc.all_reduce()
        self.corrections = {name: (*bases[name], s) for name, s in acc.finalize("mean").items()}
        for name, (_, _, s) in self.corrections.items():
            self.inverses[name].with_eigenvalues(s)
        self.stats["correction_seconds"] = time.perf_counter() - start

    def invert(self) -> None:
        """Eigendecompose the current factors with damping ``gamma()``; with corrections, use their eigenbases and
        eigenvalues instead (a fresh eigendecomposition may choose other bases in degenerate eigenspaces)."""
        assert self.factors is not None and self._targets is not None
        gamma = self.gamma()
        self.inverses = {}
        for name, (weight, _) in self._targets.layers.items():
            if self.corrections is not None:
                Q_A, Q_G, s = (t.to(weight.device) for t in self.corrections[name])
                self.inverses[name] = KroneckerInverse.from_eigenbasis(Q_A, Q_G, s, gamma, dtype=weight.dtype)
            else:
                A, G = (t.to(weight.device) for t in self.factors[name])
                self.inverses[name] = KroneckerInverse(A, G, gamma, dtype=weight.dtype)
        self._stale = False

    def _local_batches(self, trainer: pl.Trainer) -> Iterator[Any]:
        """This rank's share of the first ``num_batches`` batches of a fresh train loader."""
        if trainer.datamodule is None:
            raise RuntimeError("KFACPreconditioner needs trainer.fit(..., datamodule=...) to read curvature batches")
        loader = trainer.datamodule.train_dataloader()
        world, rank = max(1, trainer.world_size), trainer.global_rank
        if isinstance(getattr(loader, "sampler", None), DistributedSampler):  # already sharded by the loader
            yield from (b for _, b in zip(range(math.ceil(self._batches(trainer) / world)), loader, strict=False))
            return
        for i, batch in zip(range(self._batches(trainer)), loader, strict=False):
            if i % world == rank:
                yield batch

    def _batches(self, trainer: pl.Trainer) -> int:
        """``num_batches``, capped by an integer ``limit_train_batches`` (a smoke run should not estimate more)."""
        limit = getattr(trainer, "limit_train_batches", None)
        return min(self.num_batches, limit) if isinstance(limit, int) and limit > 0 else self.num_batches

    def _check_targets(self, targets: CurvatureTargets) -> None:
        if not targets.layers:
            raise ValueError("curvature_targets().layers is empty: nothing for K-FAC to precondition")
        for name, (weight, bias) in targets.layers.items():
            module = targets.network.get_submodule(name)
            if tuple(weight.shape) != tuple(module.weight.shape):
                raise ValueError(f"target weight of {name!r} has shape {tuple(weight.shape)}, "
                                 f"layer weight {tuple(module.weight.shape)}")
            if bias is not None and bias.numel() != module.weight.shape[0]:
                raise ValueError(f"target bias of {name!r} has {bias.numel()} entries, expected {weight.shape[0]}")

    # -- Lightning hooks --------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._targets = pl_module.curvature_targets()
        self._check_targets(self._targets)
        if not self.eigenvalue_correction:
            self.corrections = None  # restored EKFAC state used as plain K-FAC: invert the factors
        elif self.corrections is None:
            self.factors = None  # restored K-FAC factors without corrections: recompute both on the same batches
        if self.factors is not None:  # restored from a checkpoint: no recomputation
            self.invert()
            self._attach()
            return
        start = time.perf_counter()
        self._acc = self._new_accumulator(trainer)
        n_local = math.ceil(self._batches(trainer) / max(1, trainer.world_size))
        bar = tqdm(total=n_local, desc="K-FAC factors", disable=not trainer.is_global_zero, leave=False)
        for batch in self._local_batches(trainer):
            self._accumulate(pl_module, batch)
            bar.update(1)
        bar.close()
        self._finish_factors()
        self.stats["seconds"] = time.perf_counter() - start
        metrics = {"precond/factor_seconds": self.stats["seconds"],
                   "precond/factor_samples": float(self.stats["samples"])}
        message = (f"K-FAC ({self.fisher_type}, {self.kfac_approx}): factors of {len(self.factors or {})} layers "
                   f"from {self.stats['samples']} samples in {self.stats['seconds']:.2f}s")
        if self.eigenvalue_correction:
            self._correct(trainer, pl_module)
            metrics["precond/correction_seconds"] = self.stats["correction_seconds"]
            message += f"; EKFAC eigenvalues in {self.stats['correction_seconds']:.2f}s"
        rank_zero_info(message)
        for logger in trainer.loggers:  # self.log is not allowed in on_fit_start
            logger.log_metrics(metrics, step=trainer.global_step)
        self._attach()

    def _attach(self) -> None:
        if self._targets is not None and self._targets.attach is not None:
            self._targets.attach(self)

    # -- the preconditioner as an operator, for methods that step their own parameters ------------------------
    @torch.no_grad()
    def precondition(self, vectors: LayerTensors) -> LayerTensors:
        """``(G ⊗ A + γI)⁻¹ v`` per layer; ``vectors`` maps target layer names to (weight, bias)-shaped tensors."""
        if self._stale or not self.inverses:
            self.invert()
        out: LayerTensors = {}
        for name, (weight, bias) in vectors.items():
            out[name] = split_layer(self.inverses[name].apply(join_layer(weight, bias)), weight.shape,
                                    bias is not None)
        return out

    def set_damping_offset(self, offset: float) -> None:
        """Re-scale the inverses for ``γ = damping + offset`` (the eigendecompositions are kept)."""
        assert self._targets is not None
        self._targets.damping_offset = float(offset)
        gamma = self.gamma()
        for inverse in self.inverses.values():
            inverse.with_damping(gamma)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._targets is None or self._targets.constant or self._targets.attach is not None or self.steps == 0:
            return
        window = min(self.num_batches, self.update_every)
        if (-self.steps) % self.update_every < window:  # one of the steps just before a refresh
            if self._acc is None:
                self._acc = self._new_accumulator(trainer)
            self._accumulate(pl_module, batch)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._targets is None or self.factors is None or self._targets.attach is not None:
            return
        refresh = not self._targets.constant and self.steps > 0 and self.steps % self.update_every == 0
        if refresh and self._acc is not None:
            self._finish(trainer, pl_module)
        elif self._stale or not self.inverses:
            self.invert()
        for name, (weight, bias) in self._targets.layers.items():
            precondition_layer(self.inverses[name], weight, bias)
        self.steps += 1

    # -- checkpointing: with save_factors a resumed run preconditions with the same matrices; without (smaller
    # checkpoints: ~590 MB of factors for resnet50) it recomputes them at fit start from the resumed weights.
    # EKFAC adds the corrections with the eigenbases they belong to (about as much again as the factors).
    def state_dict(self) -> dict[str, Any]:
        keep = self.factors is not None and self.save_factors
        factors = None if not keep else {n: tuple(t.detach().cpu() for t in f) for n, f in self.factors.items()}
        corrections = None if not keep or self.corrections is None else {
            n: tuple(t.detach().cpu() for t in c) for n, c in self.corrections.items()}
        return {"factors": factors, "corrections": corrections, "steps": self.steps, "num_updates": self.num_updates,
                "stats": dict(self.stats)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.factors = state_dict.get("factors")
        self.corrections = state_dict.get("corrections")
        self.steps = int(state_dict.get("steps", 0))
        self.num_updates = int(state_dict.get("num_updates", 0))
        self.stats = dict(state_dict.get("stats", {}))
        self._stale = True
