"""method=finetune: ordinary non-linear fine-tuning of every weight (the paper's NLFT baseline)."""

from __future__ import annotations

from lqf_exp.methods.base import ClassifierModule


class FineTune(ClassifierModule):
    """All weights trained; BatchNorm in its usual train-mode behaviour; weight decay toward 0 (optimizer's)."""

    method_name = "finetune"
