"""method=lqf: train the linearized network ``f_lin(x) = f(x; w0) + J(x; w0)·δ`` (the paper's LQF).

The objective is ``loss(f_lin(x), y) + (λ/2)‖δ‖²`` with λ the configured weight decay, applied in the objective (so
a preconditioner sees the gradient of the whole quadratic) and not again by the optimizer. Evaluation also uses
``f_lin``. Checkpoints hold δ, the base head (fitted by ``head_init``) and what rebuilds the rest of w0 (the
model config: architecture + weights source), not a second copy of w0.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lqf_exp.head_init import check_head_init_kind, init_head
from lqf_exp.linearize import LinearizedNetwork
from lqf_exp.losses import ClassificationLoss
from lqf_exp.methods.base import ClassifierModule, OptimizerFactory, SchedulerFactory
from lqf_exp.methods.curvature import CurvatureTargets


class LQF(ClassifierModule):
    """Linear Quadratic Fine-Tuning: δ = w − w0 is the only trainable tensor; w0 and BN statistics stay frozen."""

    method_name = "lqf"

    def __init__(
        self,
        net: nn.Module,
        loss_fn: ClassificationLoss,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        hparams: dict[str, Any] | None = None,
        linearize: str = "all",
        bn_affine: str = "freeze",
        head_init: str = "probe",
        head_init_l2: float | None = None,
        head_init_batches: int | None = None,
    ) -> None:
        check_head_init_kind(head_init)  # fail at construction, not after the data are loaded for the fit
        keywords = getattr(optimizer, "keywords", {})
        self.weight_decay = float(keywords.get("weight_decay", 0.0))
        # The decay toward w0 is part of the objective; the optimizer must not add it a second time.
        optimizer = functools.partial(optimizer, weight_decay=0.0)
        self.head_init = head_init
        self.head_init_l2 = self.weight_decay if head_init_l2 is None else float(head_init_l2)
        self.head_init_batches = head_init_batches
        linearized = LinearizedNetwork(net, linearize=linearize, bn_affine=bn_affine)
        super().__init__(linearized, loss_fn, num_classes, optimizer, scheduler, hparams)
        # Persisted, so a resumed run keeps its fitted head instead of fitting a new one.
        self.register_buffer("head_ready", torch.tensor(False))

    @property
    def linearized(self) -> LinearizedNetwork:
        return self.net  # type: ignore[return-value]

    @property
    def damping_offset(self) -> float:
        """λ of (λ/2)‖δ‖²: the Hessian of the objective is GGN + λI, which a preconditioner must include."""
        return self.weight_decay

    def configure_trainable(self) -> None:
        """Only δ is trainable; LinearizedNetwork froze w0 already."""

    def objective(self, logits: Tensor, labels: Tensor) -> Tensor:
        loss = self.loss_fn(logits, labels)
        if self.weight_decay:
            loss = loss + 0.5 * self.weight_decay * sum(d.pow(2).sum() for d in self.linearized.deltas.values())
        return loss

    def curvature_targets(self) -> CurvatureTargets:
        return CurvatureTargets(
            network=self.linearized.base_network,
            layers=self.linearized.curvature_layers(),
            constant=self.loss_fn.kind == "mse",  # the MSE loss Hessian is constant; CE's moves
            outputs_fn=self.linearized,
        )

    # -- head initialization, before any callback's on_fit_start and before a checkpoint is restored ----------
    def setup(self, stage: str) -> None:
        if stage == "fit" and not bool(self.head_ready):
            self.initialize_head()

    def initialize_head(self, loader: DataLoader | None = None) -> None:
        """Fit (``probe``) or draw (``random``) the base head at w0; δ is zero, so f_lin stays f(x; w0)."""
        if loader is None and self.head_init == "probe":
            datamodule = self.trainer.datamodule
            loader = DataLoader(datamodule.train_dataset, batch_size=datamodule.batch_size, shuffle=False)
            if self.head_init_batches is not None:
                loader = [batch for _, batch in zip(range(self.head_init_batches), loader, strict=False)]
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        base = self.linearized.base_network
        original_device = next(base.parameters()).device
        init_head(
            base.to(device or original_device),
            loader,
            kind=self.head_init,
            loss_kind=self.loss_fn.kind,
            target_scale=getattr(self.loss_fn, "target_scale", 1.0),
            l2=self.head_init_l2,
        )
        base.to(original_device)
        self.head_ready.fill_(True)

    # -- checkpoints: δ + head + buffers that cannot be rebuilt, not a copy of w0 ---------------------------
    def _rebuildable_keys(self, state_dict: dict[str, Tensor]) -> list[str]:
        head = f"net.net.{self.linearized.head_name}."
        return [k for k in state_dict if k.startswith("net.net.") and not k.startswith(head)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in self._rebuildable_keys(state):
            del state[key]
        checkpoint["lqf_w0_source"] = {k: v for k, v in self.hparams.items() if k in ("model", "weights", "activation")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        source = checkpoint.get("lqf_w0_source", {})
        mine = {k: v for k, v in self.hparams.items() if k in source}
        if source != mine:
            raise ValueError(f"checkpoint was linearized around {source}, but this run builds w0 from {mine}")
        own = self.state_dict()
        for key in self._rebuildable_keys(own):
            checkpoint["state_dict"].setdefault(key, own[key])
