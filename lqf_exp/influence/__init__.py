"""Exact and K-FAC leave-one-out influence of training samples on a finished LQF run (paper §3.4, eq. 7–9)."""

from lqf_exp.influence.core import Influence, exact_influence, preconditioned_influence
from lqf_exp.influence.operators import jacobian_chunks, kfac_rows
from lqf_exp.influence.run_dir import FinishedRun, load_finished_run

__all__ = ["FinishedRun", "Influence", "exact_influence", "jacobian_chunks", "kfac_rows", "load_finished_run",
           "preconditioned_influence"]
