"""Curvature preconditioners: K-FAC factors, EKFAC eigenvalue corrections, their exactly damped inverse, and the
Lightning callback."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lqf_exp.precond.ekfac import EigenvalueCorrection
from lqf_exp.precond.factors import FISHER_TYPES, KFAC_APPROXES, FactorAccumulator, LayerHookPass
from lqf_exp.precond.inverse import KroneckerInverse, memory_bytes, precondition_layer

if TYPE_CHECKING:
    from lqf_exp.precond.callback import KFACPreconditioner

__all__ = [
    "FISHER_TYPES",
    "KFAC_APPROXES",
    "EigenvalueCorrection",
    "FactorAccumulator",
    "KFACPreconditioner",
    "KroneckerInverse",
    "LayerHookPass",
    "memory_bytes",
    "precondition_layer",
]


def __getattr__(name: str) -> Any:
    # The callback pulls in Lightning (seconds to import); the math modules, used by spawned workers, do not.
    if name == "KFACPreconditioner":
        from lqf_exp.precond.callback import KFACPreconditioner

        return KFACPreconditioner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
