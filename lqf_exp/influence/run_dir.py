"""A finished LQF run, rebuilt from its directory: config, data, the linearized network at its final δ, λ, and the
K-FAC operator it trained with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lqf_exp.builders import build, build_module
from lqf_exp.data import ClassificationDataModule
from lqf_exp.methods import LQF
from lqf_exp.precond import KFACOperator
from lqf_exp.precond.operator import operator_options
from lqf_exp.results import FINAL_CHECKPOINT, read_metrics

__all__ = ["FinishedRun", "Scores", "load_final_checkpoint", "load_finished_run", "scores"]

CONFIG_FILE = "config_resolved.yaml"
KFAC_STATE_PREFIX = "KFACPreconditioner"


@dataclass
class FinishedRun:
    """What influence needs of a run directory."""

    run_dir: Path
    cfg: DictConfig
    metrics: dict[str, Any]
    datamodule: ClassificationDataModule
    module: LQF
    kfac: KFACOperator | None  # None: the run used precond=none (or saved no factors)

    @property
    def weight_decay(self) -> float:
        assert self.module.weight_decay is not None
        return float(self.module.weight_decay)


def _checkpoint_path(run_dir: Path, metrics: dict[str, Any]) -> Path:
    recorded = metrics.get("final_checkpoint")
    candidates = [Path(recorded)] if recorded else []
    candidates.append(run_dir / "checkpoints" / FINAL_CHECKPOINT)  # the run directory may have moved
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{run_dir} has no final LQF checkpoint ({run_dir / 'checkpoints' / FINAL_CHECKPOINT}); runs finished before "
        "it was written must be re-run (python run.py ... skip_finished=false)")


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"cannot load checkpoint {path}: {error}") from error


def load_final_checkpoint(run: FinishedRun) -> dict[str, Any]:
    """The raw final checkpoint of a loaded run (``torch.load(weights_only=True)``), for tools that write an edited
    copy of it (forgetting)."""
    return _load_checkpoint(_checkpoint_path(run.run_dir, run.metrics))


def _kfac_operator(cfg: DictConfig, module: LQF, checkpoint: dict[str, Any]) -> KFACOperator | None:
    callback = cfg.precond.get("callback")
    if not callback:
        return None
    states = [v for k, v in checkpoint.get("callbacks", {}).items() if k.startswith(KFAC_STATE_PREFIX)]
    if not states or states[0].get("factors") is None:
        return None
    options = {k: callback[k] for k in ("fisher_type", "mc_samples", "kfac_approx", "damping", "eigenvalue_correction")}
    operator = KFACOperator(module.curvature_targets(), **operator_options(**options))
    operator.load_state_dict({k: v for k, v in states[0].items() if k != "steps"})
    operator.set_damping_offset(float(module.weight_decay or 0.0))
    return operator


def load_finished_run(run_dir: str | Path, native_precision: bool = False) -> FinishedRun:
    """Rebuild the finished LQF run in ``run_dir``; a clear error if it is not one (or cannot give influence).

    ``native_precision``: a run solved in float64 (``trainer.precision=64-true``) is rebuilt in float64, data and
    module, before its checkpoint loads (by default it is rebuilt in float32, which rounds its δ): what a consumer
    that compares solutions to 1e-6 (forgetting) needs."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    if metrics is None:
        raise FileNotFoundError(f"{run_dir} holds no finished run (no metrics.json with status 'finished')")
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir / CONFIG_FILE} is missing: the run's configuration cannot be rebuilt")
    cfg = OmegaConf.load(run_dir / CONFIG_FILE)
    assert isinstance(cfg, DictConfig)
    target = str(cfg.method.get("_target_", ""))
    if not target.endswith(".LQF"):
        raise ValueError(f"influence needs an LQF run (method=lqf), but {run_dir} ran method {target!r}")
    limit = cfg.trainer.get("limit_train_batches")
    if limit not in (None, 1.0):
        raise ValueError(f"influence needs a run solved on its whole training set; {run_dir} used "
                         f"trainer.limit_train_batches={limit}")
    float64 = native_precision and str(cfg.trainer.get("precision")).startswith("64")
    datamodule: ClassificationDataModule = build(cfg.data, **({"dtype": "float64"} if float64 else {}))
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    assert isinstance(module, LQF)
    if float64:
        module.double()
    if not module.loss_fn.constant_curvature:
        raise ValueError(f"influence needs the quadratic objective (loss=mse); {run_dir} used "
                         f"loss={module.loss_fn.kind}")
    checkpoint = _load_checkpoint(_checkpoint_path(run_dir, metrics))
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    if module.weight_decay is None or module.weight_decay <= 0:
        raise ValueError(f"influence needs λ > 0; {run_dir} was solved with weight_decay={module.weight_decay!r}")
    return FinishedRun(run_dir, cfg, metrics, datamodule, module, _kfac_operator(cfg, module, checkpoint))


@dataclass
class Scores:
    """Loss and accuracy of a module on a split, and its predictions (for per-class accuracies)."""

    loss: float
    acc: float
    samples: int
    predictions: Tensor
    labels: Tensor

    def class_acc(self, k: int) -> float | None:
        mask = self.labels == k
        return float((self.predictions[mask] == k).double().mean()) if bool(mask.any()) else None

    def class_counts(self, k: int) -> str:
        """``"right/total"`` on the images of class ``k``."""
        mask = self.labels == k
        return f"{int((self.predictions[mask] == k).sum())}/{int(mask.sum())}"


@torch.no_grad()
def scores(module: torch.nn.Module, dataset: Dataset, batch_size: int) -> Scores:
    """The split's mean loss per sample and accuracy, as a run's test step reports them (``{split}/loss``,
    ``{split}/acc``: the batch means weighted by batch size, i.e. the means over samples)."""
    losses, predictions, labels = [], [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        logits = module(x)
        losses.append(module.loss_fn.per_sample(logits, y).double())  # type: ignore[operator]
        predictions.append(logits.argmax(dim=1))
        labels.append(torch.as_tensor(y))
    loss, predicted, truth = torch.cat(losses), torch.cat(predictions), torch.cat(labels)
    return Scores(float(loss.mean()), float((predicted == truth).double().mean()), len(truth), predicted, truth)
