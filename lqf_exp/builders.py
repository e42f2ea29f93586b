"""Building a run's pieces from its composed config: the factors it is compared by, any ``_target_`` node (with
the constructor's own errors), and the method module around its network. Shared by every task."""

from __future__ import annotations

from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from lqf_exp.data import ClassificationDataModule
from lqf_exp.methods import ClassifierModule

__all__ = ["build", "build_module", "run_factors"]


def _training_settings(cfg: DictConfig) -> dict[str, Any]:
    """How the method trains: its solver (LQF) or its optimizer (the others), as report factors."""
    if "solver" in cfg.method:
        solver = cfg.method.solver
        return {
            "solver": OmegaConf.select(cfg, "hydra.runtime.choices.solver", default=None)
            or get_class(solver._target_).name,
            "lr": solver.get("lr"),
            "momentum": solver.get("momentum") if "lr" in solver else None,
            "weight_decay": cfg.method.get("weight_decay"),
            # How weight_decay=auto chooses λ (leave-one-out, or the validation path): a variant of the method.
            "lambda_rule": OmegaConf.select(cfg, "method.weight_decay_selection.rule", default=None)
            if cfg.method.get("weight_decay") == "auto" else None,
        }
    optimizer = cfg.method.get("optimizer") or {}
    return {
        "solver": None,
        "lambda_rule": None,
        "lr": optimizer.get("lr"),
        "momentum": optimizer.get("momentum", 0.0),
        "weight_decay": optimizer.get("weight_decay", 0.0),
    }


def run_factors(cfg: DictConfig) -> dict[str, Any]:
    """The factors people compare runs by; they go into ``metrics.json``, the W&B config and sweep reports."""
    return {
        "task": cfg.task.name,
        "recipe": cfg.get("recipe"),
        "model": cfg.model.arch,
        "weights": cfg.model.get("weights"),
        "pooling": cfg.model.get("pooling", "avg"),
        "activation": cfg.activation.name,
        "loss": get_class(cfg.loss._target_).kind,
        "target_scale": cfg.loss.get("target_scale"),  # MSE's α (one-hot targets × α); None for CE
        "precond": cfg.precond.name,
        "method": get_class(cfg.method._target_).method_name,
        "linearize": cfg.method.get("linearize"),
        "bn": cfg.method.get("bn"),  # fine-tuning: BatchNorm statistics updated (train) or frozen (eval)
        "data": cfg.data.name,
        "shots": cfg.data.get("shots"),
        **_training_settings(cfg),
        "batch_size": cfg.data.batch_size,
        "seed": cfg.seed,
    }


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, but a bad value surfaces as the constructor's own error (which names the value
    and what would be valid) instead of Hydra's wrapper around it."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause: BaseException | None = error
        while isinstance(cause, InstantiationException):  # nested nodes (a method's solver) wrap twice
            cause = cause.__cause__
        if isinstance(cause, ValueError | FileNotFoundError | RuntimeError):
            raise cause from None
        raise


def build_module(cfg: DictConfig, datamodule: ClassificationDataModule) -> ClassifierModule:
    # Seeded here so that a randomly initialized w0 (and head) is a function of the seed, hence rebuildable.
    torch.manual_seed(cfg.seed)
    # resolve: activation=native names the model's native_activation through an interpolation
    activation = OmegaConf.to_container(cfg.activation, resolve=True)
    net = build(cfg.model, activation=activation, num_classes=datamodule.num_classes)
    loss_fn = instantiate(cfg.loss)
    # The method's config names what it trains with (solver and stopping rule, or optimizer and schedule).
    return build(
        cfg.method, net=net, loss_fn=loss_fn, num_classes=datamodule.num_classes, hparams=run_factors(cfg),
        _convert_="all",
    )
