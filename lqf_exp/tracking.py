"""Loggers and callbacks from config, and W&B hygiene (one run per job, always finished)."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger


def stable_run_id(output_dir: str) -> str:
    """A W&B run id derived from the output dir, so a resumed run continues the same W&B run."""
    return hashlib.sha1(os.path.abspath(output_dir).encode()).hexdigest()[:16]


def instantiate_collection(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` node of a dict-of-nodes config group (callbacks, loggers)."""
    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if isinstance(node, DictConfig) and "_target_" in node]


def build_loggers(cfg: DictConfig, output_dir: str) -> list[Logger]:
    logger_cfg = cfg.get("logger")
    if logger_cfg and "wandb" in logger_cfg:
        logger_cfg = logger_cfg.copy()
        OmegaConf.set_struct(logger_cfg, False)
        if logger_cfg.wandb.get("id") is None:
            logger_cfg.wandb.id = stable_run_id(output_dir)
        # No network and no prompt: never wait on a login or an upload in offline mode.
        if logger_cfg.wandb.get("offline", True):
            os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
    return instantiate_collection(logger_cfg)


def log_config(loggers: list[Logger], resolved: dict[str, Any]) -> None:
    for logger in loggers:
        logger.log_hyperparams(resolved)


@contextmanager
def finishing_wandb(loggers: list[Logger]) -> Iterator[None]:
    """Finish the W&B run on success and on error, so the next job of a multirun starts its own run."""
    try:
        yield
    finally:
        if any(isinstance(logger, WandbLogger) for logger in loggers) and "wandb" in sys.modules:
            import wandb

            exit_code = 0 if sys.exc_info()[0] is None else 1
            if wandb.run is not None:
                wandb.finish(exit_code=exit_code)

