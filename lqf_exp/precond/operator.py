"""Damped K-FAC / EKFAC for a method's curvature targets as a plain operator, with no Lightning in it.

The Lightning callback (:mod:`.callback`), benchmarks and influence functions need the same math (factors, their
all-reduce, the damped inverse, checkpoints) but choose their batches differently (a sharded train loader, a probe
set, the steps before a refresh): the operator takes batches from its caller and leaves logging to it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lqf_exp.curvature import CurvatureTargets, LayerTensors
from lqf_exp.precond.ekfac import EigenvalueCorrection
from lqf_exp.precond.factors import FISHER_TYPES, KFAC_APPROXES, FactorAccumulator, _check_choice
from lqf_exp.precond.inverse import KroneckerInverse, check_damping, join_layer, split_layer

Factors = dict[str, tuple[Tensor, Tensor]]
Corrections = dict[str, tuple[Tensor, Tensor, Tensor]]  # layer -> (Q_A, Q_G, corrected eigenvalues s)
Batch = tuple[Tensor, Tensor | None]

# The correction pass draws its MC samples from a stream of its own; the offset is the one the callback used before the
# operator was split out of it (its update counter had advanced, plus a stream constant): mc runs keep their samples.
CORRECTION_SEED_OFFSET = 104729 + 15485863


def operator_options(fisher_type: str = "type2", mc_samples: int = 1, kfac_approx: str = "expand",
                     damping: float = 1e-3, eigenvalue_correction: bool = False) -> dict[str, Any]:
    """The operator's options checked and normalized (a callback checks them long before it has the targets)."""
    _check_choice("fisher_type", fisher_type, FISHER_TYPES)
    _check_choice("kfac_approx", kfac_approx, KFAC_APPROXES)
    if int(mc_samples) < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    if not isinstance(eigenvalue_correction, bool):
        raise ValueError(f"eigenvalue_correction must be true or false, got {eigenvalue_correction!r}")
    return {"fisher_type": fisher_type, "mc_samples": int(mc_samples), "kfac_approx": kfac_approx,
            "damping": check_damping(damping), "eigenvalue_correction": eigenvalue_correction}


def check_targets(targets: CurvatureTargets) -> None:
    """Raise a clear error when the targets' tensors do not fit the layers whose curvature is estimated."""
    if not targets.layers:
        raise ValueError("curvature_targets().layers is empty: nothing for K-FAC to precondition")
    for name, (weight, bias) in targets.layers.items():
        module = targets.network.get_submodule(name)
        if tuple(weight.shape) != tuple(module.weight.shape):
            raise ValueError(f"target weight of {name!r} has shape {tuple(weight.shape)}, "
                             f"layer weight {tuple(module.weight.shape)}")
        if bias is not None and bias.numel() != module.weight.shape[0]:
            raise ValueError(f"target bias of {name!r} has {bias.numel()} entries, expected {weight.shape[0]}")


@contextmanager
def eval_mode(network: nn.Module) -> Iterator[None]:
    """Evaluate the curvature in eval mode (no BN statistics update, no dropout), then restore every module."""
    modes = {m: m.training for m in network.modules()}
    network.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


class KFACOperator:
    """``(G ⊗ A + γI)⁻¹`` (K-FAC) or its eigenvalue-corrected form (EKFAC) for the layers of ``targets``, with
    ``γ = damping + targets.damping_offset``; a :class:`~lqf_exp.curvature.Preconditioner`.

    :meth:`estimate` (or :meth:`begin`, :meth:`accumulate`, :meth:`finish`: batches that arrive one at a time) computes
    the factors from the caller's batches (under DDP each rank's shard; the sums are all-reduced) and inverts them.
    With ``eigenvalue_correction`` the batches are held for a second pass that replaces the eigenvalues by the exact
    curvature diagonal in the Kronecker eigenbasis (:mod:`.ekfac`). The state (factors, corrections with their
    eigenbases, stats) restores without recomputation; :meth:`retarget` moves it to the targets of a new fit.
    """

    def __init__(self, targets: CurvatureTargets, fisher_type: str = "type2", mc_samples: int = 1,
                 kfac_approx: str = "expand", damping: float = 1e-3, eigenvalue_correction: bool = False) -> None:
        options = operator_options(fisher_type, mc_samples, kfac_approx, damping, eigenvalue_correction)
        self.fisher_type, self.mc_samples, self.kfac_approx = fisher_type, options["mc_samples"], kfac_approx
        self.damping, self.eigenvalue_correction = options["damping"], eigenvalue_correction
        self.factors: Factors | None = None
        self.corrections: Corrections | None = None
        self.inverses: dict[str, KroneckerInverse] = {}
        self.stats: dict[str, float] = {}
        self.num_updates = 0  # completed factor estimates; part of the state, so MC seeds keep advancing on resume
        self._acc: FactorAccumulator | None = None
        self._batch_cache: list[Batch] = []  # this estimate's batches, for the eigenvalue correction
        self._seed, self._seconds, self._stale = 0, 0.0, False  # MC seed and compute time of this estimate
        self.retarget(targets)

    # -- targets and damping ------------------------------------------------------------------------------------
    @property
    def targets(self) -> CurvatureTargets:
        return self._targets

    def retarget(self, targets: CurvatureTargets) -> None:
        """Precondition the layers of ``targets`` (e.g. a new fit's, after a restore) with the current factors; the
        inverses are rebuilt on their device and dtype at the next use. An estimate in progress is dropped."""
        check_targets(targets)
        self._targets = targets
        self._acc, self._batch_cache, self._stale = None, [], True

    def gamma(self) -> float:
        """Total damping: ``damping`` plus the targets' ``damping_offset`` (the method's λ toward w0)."""
        return check_damping(self.damping + float(self._targets.damping_offset))

    def set_damping_offset(self, offset: float) -> None:
        """Re-scale the inverses for ``γ = damping + offset``; the eigendecompositions are kept."""
        self._targets.damping_offset = float(offset)
        gamma = self.gamma()
        for inverse in self.inverses.values():
            inverse.with_damping(gamma)

    # -- estimation ---------------------------------------------------------------------------------------------
    def estimate(self, batches: Iterable[Batch], generator_seed: int = 0, progress: bool = False) -> None:
        """Factors (and EKFAC corrections) from ``batches`` of ``(x, y)``; ``generator_seed`` seeds the MC samples
        (make it differ across ranks and estimates). ``stats["seconds"]`` includes producing the batches."""
        start = time.perf_counter()
        self.begin(generator_seed)
        for x, y in tqdm(batches, desc="K-FAC factors", disable=not progress, leave=False):
            self.accumulate(x, y)
        self._seconds = time.perf_counter() - start
        self.finish(progress)

    @property
    def accumulating(self) -> bool:
        """Whether :meth:`begin` started an estimate that :meth:`finish` has not completed."""
        return self._acc is not None

    def begin(self, generator_seed: int = 0) -> None:
        """Start an estimate from batches given one at a time to :meth:`accumulate`."""
        self._seed, self._seconds, self._batch_cache = int(generator_seed), 0.0, []
        self._acc = FactorAccumulator(self._targets.network, self._layer_bias(), self._targets.loss,
                                      fisher_type=self.fisher_type, mc_samples=self.mc_samples,
                                      kfac_approx=self.kfac_approx, generator=self._generator(self._seed))

    def accumulate(self, x: Tensor, y: Tensor | None = None) -> int:
        """Add one batch (moved to the targets' device) to the estimate; return its number of samples."""
        if self._acc is None:
            raise RuntimeError("KFACOperator.accumulate needs begin() first")
        start = time.perf_counter()
        if self.eigenvalue_correction:
            self._batch_cache.append((x, y))  # as given (often on the CPU), moved again for the second pass
        count = self._add(self._acc, x, y)
        self._seconds += time.perf_counter() - start
        return count

    def finish(self, progress: bool = False) -> None:
        """All-reduce and normalize the sums, invert, and with EKFAC correct the eigenvalues over the same batches."""
        if self._acc is None:
            raise RuntimeError("KFACOperator.finish needs begin() first")
        start = time.perf_counter()
        acc, self._acc = self._acc, None
        acc.all_reduce()
        self.factors = acc.finalize("mean", dtype=self._first_weight().dtype)
        self.corrections = None  # they belonged to the previous factors' eigenbases
        self.num_updates += 1
        self.stats["samples"] = acc.count
        self.invert()
        self.stats["seconds"] = self._seconds + time.perf_counter() - start
        if self.eigenvalue_correction:
            self._correct(progress)

    def _correct(self, progress: bool) -> None:
        """EKFAC: the exact curvature diagonal in the current inverses' eigenbases, over the factors' batches."""
        start = time.perf_counter()
        bases = {name: (inv.Q_A, inv.Q_G) for name, inv in self.inverses.items()}
        acc = EigenvalueCorrection(self._targets.network, self._layer_bias(), self._targets.loss, bases,
                                   fisher_type=self.fisher_type, mc_samples=self.mc_samples,
                                   generator=self._generator(self._seed + CORRECTION_SEED_OFFSET))
        batches, self._batch_cache = self._batch_cache, []
        for x, y in tqdm(batches, desc="EKFAC eigenvalues", disable=not progress, leave=False):
            self._add(acc, x, y)
        acc.all_reduce()
        self.corrections = {name: (*bases[name], s) for name, s in acc.finalize("mean").items()}
        for name, (_, _, s) in self.corrections.items():
            self.inverses[name].with_eigenvalues(s)
        self.stats["correction_seconds"] = time.perf_counter() - start

    def _add(self, acc: FactorAccumulator | EigenvalueCorrection, x: Tensor, y: Tensor | None) -> int:
        device = self._first_weight().device
        with eval_mode(self._targets.network):
            return acc.accumulate(x.to(device), None if y is None else y.to(device), self._targets.outputs_fn)

    def _first_weight(self) -> Tensor:
        return next(iter(self._targets.layers.values()))[0]

    def _layer_bias(self) -> dict[str, bool]:
        return {name: bias is not None for name, (_, bias) in self._targets.layers.items()}

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self._first_weight().device).manual_seed(seed)

    # -- the inverse --------------------------------------------------------------------------------------------
    def invert(self) -> None:
        """Eigendecompose the factors with damping ``gamma()``; with corrections, use their eigenbases and
        eigenvalues instead (a fresh eigendecomposition may choose other bases in degenerate eigenspaces)."""
        if self.factors is None:
            raise RuntimeError("KFACOperator has no factors: estimate() or load_state_dict() first")
        missing = sorted(set(self._targets.layers) - set(self.factors))
        if missing:
            raise ValueError(f"the factors have no layers {missing} of the targets")
        gamma, self.inverses = self.gamma(), {}
        for name, (weight, _) in self._targets.layers.items():
            if self.corrections is not None:
                Q_A, Q_G, s = (t.to(weight.device) for t in self.corrections[name])
                self.inverses[name] = KroneckerInverse.from_eigenbasis(Q_A, Q_G, s, gamma, dtype=weight.dtype)
            else:
                A, G = (t.to(weight.device) for t in self.factors[name])
                self.inverses[name] = KroneckerInverse(A, G, gamma, dtype=weight.dtype)
        self._stale = False

    def current_inverses(self) -> dict[str, KroneckerInverse]:
        """The inverses, rebuilt first when a restore or :meth:`retarget` left them stale."""
        if self._stale or not self.inverses:
            self.invert()
        return self.inverses

    @torch.no_grad()
    def precondition(self, vectors: LayerTensors) -> LayerTensors:
        """``(G ⊗ A + γI)⁻¹ v`` per layer for (weight, bias)-shaped ``vectors`` of target layers; W̃ = (W b)."""
        inverses = self.current_inverses()
        return {name: split_layer(inverses[name].apply(join_layer(weight, bias)), weight.shape, bias is not None)
                for name, (weight, bias) in vectors.items()}

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Factors and corrections (on the CPU), the number of estimates and the stats."""
        factors, corrections = (None if d is None else {n: tuple(t.detach().cpu() for t in ts) for n, ts in d.items()}
                                for d in (self.factors, self.corrections))
        return {"factors": factors, "corrections": corrections, "num_updates": self.num_updates,
                "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore without recomputing; the inverses are rebuilt at the next use. Without ``eigenvalue_correction``
        an EKFAC state serves as plain K-FAC (its factors); with it, a state without corrections keeps no factors,
        so that the next estimate computes both from the same batches."""
        factors, corrections = state.get("factors"), state.get("corrections")
        if not self.eigenvalue_correction:
            corrections = None
        elif corrections is None:
            factors = None
        self.factors, self.corrections = factors, corrections
        self.num_updates = int(state.get("num_updates", 0))
        self.stats = dict(state.get("stats", {}))
        self.inverses, self._acc, self._batch_cache, self._stale = {}, None, [], True
