"""The LightningModule shared by every training method: one classifier, one loss, accuracy metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from torchmetrics import MaxMetric, MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from lqf_exp.curvature import CurvatureTargets
from lqf_exp.losses import ClassificationLoss
from lqf_exp.solvers.stopping import DivergenceError

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]

_PRECONDITIONED_LAYERS = (nn.Linear, nn.Conv2d)


class ClassifierModule(pl.LightningModule):
    """Trains ``self.net`` (whatever tensors of it require grad) with ``loss_fn``; logs ``{split}/loss|acc``.

    Subclasses decide what is trainable (``configure_trainable``), how it is trained, and which network carries the
    curvature (``curvature_targets``). ``test_checkpoint`` says which weights the test uses: ``best`` (the epoch
    with the best validation accuracy: early stopping) or ``final`` (the end of training: a solved problem).
    """

    method_name = "base"
    test_checkpoint = "best"

    def __init__(
        self,
        net: nn.Module,
        loss_fn: ClassificationLoss,
        num_classes: int,
        hparams: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn
        self.num_classes = num_classes
        # Only primitive values go to hparams, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(hparams or {"method": self.method_name})
        self.configure_trainable()
        metric = lambda: MulticlassAccuracy(num_classes=num_classes, average="micro")  # noqa: E731
        self.train_acc, self.val_acc, self.test_acc = metric(), metric(), metric()
        # Loss and sample count as summed states (torchmetrics all-reduces them), so that under data parallelism the
        # val/test loss is the mean over all samples and not a mean of per-rank means, and the count shows that each
        # sample was scored once.
        self.eval_loss = nn.ModuleDict({split: MeanMetric() for split in ("val", "test")})
        self.eval_samples = nn.ModuleDict({split: SumMetric() for split in ("val", "test")})
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # a resumed run keeps its best-validation record
        # The test labels and predicted classes of this process's last test pass, in loader order (the test loader
        # does not shuffle): what lets two runs be compared prediction by prediction, not only by error counts.
        self.test_labels: list[Tensor] = []
        self.test_predictions: list[Tensor] = []

    # -- what is trained --------------------------------------------------------------------------------------
    def configure_trainable(self) -> None:
        """Default: every parameter of ``net`` is trained."""
        self.net.requires_grad_(True)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def curvature_targets(self) -> CurvatureTargets:
        """Every trainable Linear/Conv2d layer of ``net``; its curvature moves with the weights."""
        layers = {
            name: (module.weight, module.bias if module.bias is not None and module.bias.requires_grad else None)
            for name, module in self.net.named_modules()
            if isinstance(module, _PRECONDITIONED_LAYERS) and module.weight.requires_grad
        }
        return CurvatureTargets(network=self.net, layers=layers, loss=self.loss_fn, constant=False)

    # -- steps ------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def objective(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The training objective; methods that regularize inside the loss (LQF) extend it."""
        return self.loss_fn(logits, labels)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.objective(logits, labels)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], split: str, accuracy: MulticlassAccuracy) -> Tensor:
        images, labels = batch
        return self._score(self(images), labels, split, accuracy)

    def _score(self, logits: Tensor, labels: Tensor, split: str, accuracy: MulticlassAccuracy) -> Tensor:
        loss = self.loss_fn(logits, labels)
        accuracy(logits, labels)
        mean_loss, samples = self.eval_loss[split], self.eval_samples[split]
        mean_loss(loss.detach(), len(labels))
        samples(len(labels))
        self.log(f"{split}/loss", mean_loss, on_epoch=True, prog_bar=split == "val")
        self.log(f"{split}/acc", accuracy, on_epoch=True, prog_bar=True)
        self.log(f"{split}/samples", samples, on_epoch=True)
        return loss

    def on_train_start(self) -> None:
        # The sanity-check validation must not count as the best epoch.
        self.val_acc_best.reset()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val", self.val_acc)

    def on_validation_epoch_end(self) -> None:
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=False, sync_dist=True)

    def on_test_epoch_start(self) -> None:
        self.test_labels, self.test_predictions = [], []

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        self.test_labels.append(labels.detach().cpu())
        self.test_predictions.append(logits.detach().argmax(dim=1).cpu())
        return self._score(logits, labels, "test", self.test_acc)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0]).argmax(dim=1)

    def run_summary(self) -> dict[str, Any]:
        """What metrics.json records about how the method trained, beyond its metrics (a method adds entries)."""
        return {}

    # -- the data a method reads beyond the training loop (head fits, full-data objectives) --------------------
    def train_data(self) -> Any:
        """The training samples: all of them, or what ``limit_train_batches`` lets train (a smoke run)."""
        datamodule = self.trainer.datamodule
        dataset, limit, batch = datamodule.train_dataset, self.trainer.limit_train_batches, datamodule.batch_size
        if isinstance(limit, int) and limit * batch < len(dataset):
            return Subset(dataset, list(range(limit * batch)))
        if isinstance(limit, float) and limit < 1.0:
            return Subset(dataset, list(range(max(1, int(limit * len(dataset))))))
        return dataset

    def eval_loader(self, dataset: Any) -> DataLoader:
        """``dataset`` in order, at the evaluation batch size (no shuffling: head fits are deterministic)."""
        return DataLoader(dataset, batch_size=self.trainer.datamodule.eval_batch_size, shuffle=False)



class GradientMethod(ClassifierModule):
    """A method trained by a torch optimizer on its loss: ``optimizer``/``scheduler`` are partials from
    ``conf/optim``/``conf/schedule`` (the method's config passes them)."""

    def __init__(
        self,
        net: nn.Module,
        loss_fn: ClassificationLoss,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        hparams: dict[str, Any] | None = None,
    ) -> None:
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        super().__init__(net, loss_fn, num_classes, hparams)

    def optimizer_parameters(self) -> list[nn.Parameter]:
        params = list(self.trainable_parameters())
        if not params:
            raise RuntimeError(f"method={self.method_name} left no trainable parameter")
        return params

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # A non-finite loss is a diverged run, recorded as such (metrics.json status), not a finished one at chance.
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss.detach()).all():
            lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else None
            raise DivergenceError(
                f"method={self.method_name} diverged at step {self.global_step}: training loss {float(loss):g} "
                f"(optimizer lr {lr}); lower optim.lr, or try method.bn=train"
            )

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(params=self.optimizer_parameters())
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        # The run's length in optimizer steps: max_steps, or epochs × batches (what early stopping may cut short).
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
