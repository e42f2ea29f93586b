"""The Jacobian of the linearized blocks on the training set, computed once and kept, so a solve needs no network pass.

For a problem small enough to store ``J`` (``N·C`` rows × ``P`` δ entries; ``method.jacobian_cache_gb``), every
quantity a solver asks the objective for is a product with this one matrix: ``f_lin = f0 + Jδ`` (``[N, C]``), the
gradient ``Jᵀ ∂ℓ/∂f / N + λδ`` and the curvature product ``Jᵀ H_ℓ J v / N + λv``, each two matrix-vector products
(tens of milliseconds where a network pass takes seconds). The JVP path stays what evaluates ``f_lin`` on new inputs
and what runs when ``J`` does not fit; the solve is the same (tests/test_jacobian_cache.py: same δ* to 1e-8).

Rows are keyed by sample index, in the order of the training set the module iterates (``train_data()``, unshuffled),
which is the order of the sums over samples. The rows come from
:meth:`~lqf_exp.linearize.LinearizedNetwork.jacobian` (C backward passes per batch: about C network passes once).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
from torch import Tensor

from lqf_exp.linearize import LinearizedNetwork

log = logging.getLogger(__name__)

__all__ = ["JacobianCache", "jacobian_cache_refusal", "jacobian_gigabytes"]

_CHUNK = 64  # samples per Jacobian computation


def jacobian_gigabytes(samples: int, classes: int, params: int, dtype: torch.dtype) -> float:
    return samples * classes * params * torch.empty((), dtype=dtype).element_size() / 2**30


def jacobian_cache_refusal(samples: int, classes: int, params: int, dtype: torch.dtype, limit_gb: float | None,
                           world_size: int, constant_curvature: bool) -> str | None:
    """Why the Jacobian of this training set is not cached (a message naming the sizes), or None when it is."""
    if limit_gb is None:
        return "method.jacobian_cache_gb=null"
    if world_size > 1:
        # Each rank would hold the rows of its share and every product would need an all-reduce per iteration:
        # not worth it for a problem that fits one process; the JVP path scales with the ranks instead.
        return f"data parallelism ({world_size} processes): the cache serves one process"
    if not constant_curvature:
        return "the loss is not quadratic (its curvature moves with the outputs)"
    size = jacobian_gigabytes(samples, classes, params, dtype)
    if size > limit_gb:
        return (f"J is {samples}·{classes} rows × {params} δ entries = {size:.1f} GB in {dtype}, above "
                f"method.jacobian_cache_gb={limit_gb:g}")
    return None


class JacobianCache:
    """``J`` (``[N, C, P]``), the outputs at w0 ``f0`` (``[N, C]``) and the labels of the training set, by index.

    Build it with :meth:`build`; :meth:`jvp` and :meth:`vjp` are the two products every solver step reduces to.
    """

    def __init__(self, jacobian: Tensor, base: Tensor, labels: Tensor, seconds: float = 0.0) -> None:
        if jacobian.dim() != 3 or base.shape != jacobian.shape[:2] or labels.shape != jacobian.shape[:1]:
            raise ValueError(f"inconsistent cache shapes: J {tuple(jacobian.shape)}, f0 {tuple(base.shape)}, "
                             f"labels {tuple(labels.shape)}")
        self.jacobian, self.base, self.labels, self.seconds = jacobian, base, labels, seconds
        self._rows = jacobian.view(-1, jacobian.shape[2])

    @classmethod
    @torch.no_grad()
    def build(cls, net: LinearizedNetwork, batches: Iterable[tuple[Tensor, Tensor]], samples: int) -> JacobianCache:
        """Rows for ``samples`` training samples, in the order ``batches`` yields them (the training-set order)."""
        started = time.perf_counter()
        params = sum(d.numel() for d in net.delta_list())
        jacobian: Tensor | None = None
        base, labels = [], []
        filled = 0
        for x, y in batches:
            outputs = net.apply_to_base(x).detach()
            if jacobian is None:  # written in place, batch by batch: no temporary of a batch's rows
                dtype = net.delta_list()[0].dtype
                jacobian = torch.empty(samples, outputs.shape[1], params, dtype=dtype, device=outputs.device)
            # In chunks: the per-sample products run best on a few dozen samples (evaluation batches of 512 took
            # 0.55 s per 64 samples on the 2-core box, chunks of 64 0.45 s).
            for start in range(0, len(y), _CHUNK):
                rows = slice(filled + start, filled + min(start + _CHUNK, len(y)))
                net.jacobian(x[start : start + _CHUNK], out=jacobian[rows])
            base.append(outputs.to(jacobian.dtype))
            labels.append(y)
            filled += len(y)
            log.info("Jacobian cache: %d/%d samples (%.0f s)", filled, samples, time.perf_counter() - started)
        if jacobian is None or filled != samples:
            raise RuntimeError(f"the Jacobian cache expected {samples} training samples, the loader gave {filled}")
        return cls(jacobian, torch.cat(base), torch.cat(labels), time.perf_counter() - started)

    @property
    def samples(self) -> int:
        return self.jacobian.shape[0]

    @property
    def gigabytes(self) -> float:
        return self.jacobian.numel() * self.jacobian.element_size() / 2**30

    def jvp(self, flat: Tensor) -> Tensor:
        """``J v`` as ``[N, C]`` (float64) for a flat ``v`` (``[P]``) or a block ``[P, k]`` → ``[N, C, k]``."""
        out = self._rows @ flat.to(self._rows.dtype)
        return out.view(*self.base.shape, *flat.shape[1:]).double()

    def vjp(self, outputs: Tensor) -> Tensor:
        """``Jᵀ u`` (float64, ``[P]``) for ``u`` shaped ``[N, C]`` (or ``[N, C, k]`` → ``[P, k]``)."""
        flat = outputs.reshape(self._rows.shape[0], *outputs.shape[2:]).to(self._rows.dtype)
        return (self._rows.T @ flat).double()
