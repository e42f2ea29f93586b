"""Forgetting: remove training samples from a finished LQF run, exactly or to a certified tolerance.

``python -m lqf_exp.forget <run dir> --drop <index file>`` (or ``--drop-class k``) writes a new run directory whose δ
minimizes the run's objective on the remaining samples (same w0 and λ, the mean over what remains; with
``--refit-head`` the probe head of w0 is refitted without them first). :mod:`lqf_exp.forget.core` has the problem
and its three solutions, :mod:`lqf_exp.forget.command` the command.
"""

from lqf_exp.forget.command import METHODS, ForgetOptions, forget
from lqf_exp.forget.core import Solution, conjugate_gradient_from, exact_solution

__all__ = ["METHODS", "ForgetOptions", "Solution", "conjugate_gradient_from", "exact_solution", "forget"]
