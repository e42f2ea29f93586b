"""method=probe: a linear probe — the new head fitted to its optimum on frozen pre-trained features.

The probe is a convex problem on fixed features, so it is solved, not trained: the loss fits the head in closed form
(ridge onto α·onehot for MSE) or by full-batch L-BFGS (logistic regression for CE), with the one penalty ``l2``
chosen on the validation loss (``auto``) or given. ``fit_probe_head`` is shared with ``finetune`` (LP-FT: fine-tuning
from the probe head).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lqf_exp.head_fit import PROBE_L2_GRID
from lqf_exp.head_init import fit_validated_head, init_head
from lqf_exp.losses import ClassificationLoss
from lqf_exp.methods.base import ClassifierModule
from lqf_exp.models.heads import get_head


def head_of(net: nn.Module) -> nn.Linear:
    """The classification head (``fc`` on ResNets, ``head`` on the ViT: :func:`lqf_exp.models.heads.head_name`)."""
    return get_head(net)


def parse_head_l2(value: float | str, key: str) -> float | None:
    """``auto`` (None: chosen on validation) or a number > 0."""
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{key} must be auto or a number > 0, got {value!r}")
    return float(value)


def fit_probe_head(module: ClassifierModule, l2: float | None, grid: tuple[float, ...]) -> dict[str, Any]:
    """Fit ``module.net``'s head on its frozen features of the training data (``l2``, or the grid value of lowest
    validation loss when None); returns what metrics.json records about the fit."""
    device = module.trainer.strategy.root_device
    original = next(module.net.parameters()).device
    net = module.net.to(device)
    train = module.eval_loader(module.train_data())
    try:
        if l2 is None:
            chosen = fit_validated_head(net, train, module.eval_loader(module.trainer.datamodule.val_dataset),
                                        module.loss_fn, grid, device)
            return {"head_l2": chosen.fit.l2, "head_l2_curve": {f"{k:g}": v for k, v in chosen.curve.items()}}
        fit = init_head(net, train, kind="probe", loss=module.loss_fn, l2=l2, device=device)
        return {"head_l2": None if fit is None else fit.l2}
    finally:
        net.to(original)


class FittedHead:
    """Mixin for a :class:`ClassifierModule` whose head is fitted once, when the fit starts, by
    :func:`fit_probe_head` (``head_l2``, ``head_l2_grid``); the fit's record is checkpointed with a flag, so a resumed
    run keeps its head instead of fitting a new one."""

    head_l2: float | None
    head_l2_grid: tuple[float, ...]

    def _track_head(self, fitted: bool) -> None:
        self.head_record: dict[str, Any] = {}
        self.register_buffer("head_ready", torch.tensor(fitted))  # type: ignore[attr-defined]

    def setup(self, stage: str) -> None:
        if stage == "fit" and not bool(self.head_ready):
            self.head_record = fit_probe_head(self, self.head_l2, self.head_l2_grid)  # type: ignore[arg-type]
            self.head_ready.fill_(True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["probe_head"] = self.head_record

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.head_record = dict(checkpoint.get("probe_head", {}))


class Probe(FittedHead, ClassifierModule):
    """Backbone frozen and kept in eval mode (BN statistics frozen); the head is fitted once, before the first
    epoch, and the one epoch that follows only measures it. Tested on the fitted head (``final``)."""

    method_name = "probe"
    test_checkpoint = "final"

    def __init__(
        self,
        net: nn.Module,
        loss_fn: ClassificationLoss,
        num_classes: int,
        l2: float | str = "auto",
        l2_grid: tuple[float, ...] | list[float] = PROBE_L2_GRID,
        hparams: dict[str, Any] | None = None,
    ) -> None:
        self.head_l2 = parse_head_l2(l2, "method.l2")
        self.head_l2_grid = tuple(float(v) for v in l2_grid)
        super().__init__(net, loss_fn, num_classes, hparams)
        self.automatic_optimization = False
        self._track_head(fitted=False)

    def configure_trainable(self) -> None:
        self.net.requires_grad_(False)  # nothing takes a gradient step: the head is solved
        head_of(self.net)
        self.net.eval()

    def train(self, mode: bool = True) -> Probe:
        # Lightning calls .train() at every epoch; the frozen backbone must keep its running statistics.
        super().train(mode)
        self.net.eval()
        return self

    def configure_optimizers(self) -> None:
        return None

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        with torch.no_grad():
            logits = self(images)
        self.train_acc(logits, labels)
        self.log("train/loss", self.loss_fn(logits, labels), on_step=False, on_epoch=True, batch_size=len(labels))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_train_epoch_end(self) -> None:
        self.trainer.should_stop = True  # the head is already at its optimum

    def run_summary(self) -> dict[str, Any]:
        return {"head": dict(self.head_record)}
