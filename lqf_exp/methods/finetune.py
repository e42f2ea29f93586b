"""method=finetune: ordinary non-linear fine-tuning of every weight (the paper's NLFT baseline)."""

from __future__ import annotations

from lqf_exp.methods.base import GradientMethod


class FineTune(GradientMethod):
    """All weights trained; BatchNorm in its usual train-mode behaviour; weight decay toward 0 (optimizer's)."""

    method_name = "finetune"
