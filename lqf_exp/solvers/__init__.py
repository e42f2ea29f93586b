"""Solvers of the LQF objective; ``conf/solver/<name>.yaml`` names one of them (``method=lqf`` uses the group).

``adaptive`` (default: preconditioned direction, step and momentum from the exact batch quadratic, no learning rate),
``sgd`` (fixed learning rate, the paper's optimizer), ``cg`` (full-batch preconditioned conjugate gradient) and
``kernel`` (the closed form through the dual system). All minimize the same :class:`LQFObjective`.
"""

from lqf_exp.solvers.adaptive import AdaptiveSolver
from lqf_exp.solvers.base import Solver
from lqf_exp.solvers.cg import CGSolver, ConjugateGradient, conjugate_gradient
from lqf_exp.solvers.controller import SolveController
from lqf_exp.solvers.dual import DualSystem, LambdaChoice
from lqf_exp.solvers.kernel import KernelSolver, check_kernel_size
from lqf_exp.solvers.objective import Evaluation, LQFObjective
from lqf_exp.solvers.sgd import SGDSolver
from lqf_exp.solvers.spectrum import preconditioned_max_eigenvalue
from lqf_exp.solvers.stopping import DivergenceError, StoppingRule
from lqf_exp.solvers.weight_decay import WEIGHT_DECAY_GRID, ValidationPath, WeightDecaySelection

__all__ = [
    "WEIGHT_DECAY_GRID",
    "AdaptiveSolver",
    "CGSolver",
    "ConjugateGradient",
    "DualSystem",
    "Evaluation",
    "KernelSolver",
    "LQFObjective",
    "LambdaChoice",
    "SGDSolver",
    "SolveController",
    "Solver",
    "DivergenceError",
    "StoppingRule",
    "ValidationPath",
    "WeightDecaySelection",
    "check_kernel_size",
    "conjugate_gradient",
    "preconditioned_max_eigenvalue",
]
