"""Curvature preconditioners: K-FAC factors, EKFAC eigenvalue corrections, their exactly damped inverse, the
Lightning-free operator that combines them, and the Lightning callback that drives it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lqf_exp.precond.ekfac import EigenvalueCorrection
from lqf_exp.precond.factors import FISHER_TYPES, KFAC_APPROXES, FactorAccumulator, LayerHookPass
from lqf_exp.precond.inverse import KroneckerInverse, memory_bytes, precondition_layer
from lqf_exp.precond.operator import KFACOperator

if TYPE_CHECKING:
    from lqf_exp.precond.callback import KFACPreconditioner

__all__ = [
    "FISHER_TYPES",
    "KFAC_APPROXES",
    "EigenvalueCorrection",
    "FactorAccumulator",
    "KFACOperator",
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
