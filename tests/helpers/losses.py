"""The project's losses by name, as test cases parametrize them."""

from __future__ import annotations

from lqf_exp.losses import ClassificationLoss, CrossEntropyLoss, ScaledMSELoss

ALPHA = 15.0


def make_loss(name: str, target_scale: float = ALPHA) -> ClassificationLoss:
    """``mse`` (scaled one-hot targets, α = ``target_scale``) or ``ce``."""
    return {"mse": lambda: ScaledMSELoss(target_scale), "ce": CrossEntropyLoss}[name]()
