"""method=finetune: ordinary non-linear fine-tuning of every weight (the paper's NLFT baseline, and LP-FT).

``head_init=probe`` starts from the linear probe's head (fitted as ``method=probe`` fits it): LP-FT (Kumar et al.,
ICLR 2022), which keeps the pre-trained features from being distorted by a random head's large early gradients.
``bn=train`` updates BatchNorm's running statistics as fine-tuning users do; ``bn=eval`` freezes them (γ and β are
still trained), which is what LQF does and what helps at few shots.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lqf_exp.head_fit import PROBE_L2_GRID
from lqf_exp.losses import ClassificationLoss
from lqf_exp.methods.base import GradientMethod, OptimizerFactory, SchedulerFactory
from lqf_exp.methods.probe import FittedHead, head_of, parse_head_l2
from lqf_exp.options import BN_MODES, HEAD_INITS


class FineTune(FittedHead, GradientMethod):
    """All weights trained by the optimizer, with its weight decay toward 0; the head drawn at random or fitted
    first (``head_init``); BatchNorm statistics updated or frozen (``bn``)."""

    method_name = "finetune"

    def __init__(
        self,
        net: nn.Module,
        loss_fn: ClassificationLoss,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        hparams: dict[str, Any] | None = None,
        head_init: str = "random",
        head_l2: float | str = "auto",
        head_l2_grid: tuple[float, ...] | list[float] = PROBE_L2_GRID,
        bn: str = "train",
    ) -> None:
        if head_init not in HEAD_INITS:
            raise ValueError(f"method.head_init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}")
        if bn not in BN_MODES:
            raise ValueError(f"method.bn must be one of {', '.join(BN_MODES)}, got {bn!r}")
        self.head_init, self.bn = head_init, bn
        self.head_l2 = parse_head_l2(head_l2, "method.head_l2")
        self.head_l2_grid = tuple(float(v) for v in head_l2_grid)
        super().__init__(net, loss_fn, num_classes, optimizer, scheduler, hparams)
        self._track_head(fitted=head_init == "random")
        if head_init == "probe":
            head_of(net)  # fail now, not after loading the data
        self._apply_bn_mode()

    def setup(self, stage: str) -> None:
        super().setup(stage)  # the probe head's fit (LP-FT) leaves every module in train mode
        self._apply_bn_mode()

    def train(self, mode: bool = True) -> FineTune:
        super().train(mode)
        self._apply_bn_mode()
        return self

    def _apply_bn_mode(self) -> None:
        # Lightning (2.x) keeps the modes modules had at fit start, and restores them after each validation.
        if self.bn == "eval":
            for module in self.net.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()

    def run_summary(self) -> dict[str, Any]:
        return {"head": {"head_init": self.head_init, "bn": self.bn, **self.head_record}}
