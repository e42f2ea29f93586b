"""Exact and K-FAC leave-one-out influence of training samples on a finished LQF run (paper §3.4, eq. 7–9)."""

from lqf_exp.influence.core import Influence, exact_influence, preconditioned_influence
from lqf_exp.influence.operators import jacobian_chunks, kfac_rows, stack_jacobians

__all__ = ["Influence", "exact_influence", "jacobian_chunks", "kfac_rows", "preconditioned_influence",
           "stack_jacobians"]
