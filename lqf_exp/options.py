"""The valid values of every string-valued option, in one list each.

The constructors that take an option check against these tuples, and :mod:`lqf_exp.validation` builds its rules
(and their messages) from the same tuples, so a new value is added in one place. Plain data with no imports:
anything may import it, including modules that load early and must not pull in torch.
"""

from __future__ import annotations

__all__ = [
    "ACTIVATIONS",
    "BN_AFFINE",
    "BN_MODES",
    "FISHER_TYPES",
    "HEAD_INITS",
    "KFAC_APPROXES",
    "POOLINGS",
    "TANGENT_PATHS",
    "TASKS",
]

# activation.name (lqf_exp.models.activations)
ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu", "gelu")
# model.pooling (lqf_exp.models.pooling)
POOLINGS: tuple[str, ...] = ("avg", "sqrt_cov")
# method.bn_affine (lqf_exp.linearize.LinearizedNetwork): BatchNorm γ/β frozen at w0, or given a δ
BN_AFFINE: tuple[str, ...] = ("freeze", "linearize")
# method.tangent (lqf_exp.linearize.LinearizedNetwork): how J·v is computed
TANGENT_PATHS: tuple[str, ...] = ("auto", "fused", "autodiff")
# method.bn (lqf_exp.methods.finetune): BatchNorm statistics updated or frozen while fine-tuning
BN_MODES: tuple[str, ...] = ("train", "eval")
# method.head_init (lqf_exp.head_init, lqf_exp.methods.finetune)
HEAD_INITS: tuple[str, ...] = ("probe", "random")
# precond.callback.fisher_type and kfac_approx (lqf_exp.precond.factors)
FISHER_TYPES: tuple[str, ...] = ("type2", "mc", "empirical")
KFAC_APPROXES: tuple[str, ...] = ("expand", "reduce")
# task.name (the conf/task group, dispatched in lqf_exp.pipeline)
TASKS: tuple[str, ...] = ("finetune", "pretrain", "online")
