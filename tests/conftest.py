"""Compose-API fixtures: configs built exactly as the CLI builds them, with outputs under ``tmp_path``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from lqf_exp.config import compose_config, register_resolvers

from .helpers.runtime import one_thread  # noqa: F401  (a fixture, shared by the modules that ask for it)

REPO_ROOT = Path(__file__).resolve().parent.parent
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

# Tests never talk to W&B's servers.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
register_resolvers()

# Fast settings for runs through the same entry point as the CLI.
SMOKE = ["debug=smoke", "model.weights=null", "data.batch_size=16", "precond=none"]

requires_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST_ROOT.is_dir(), reason="needs `apt-get install dataset-fashion-mnist`"
)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """``make_cfg(overrides)`` → a config whose outputs go to ``tmp_path / 'run'``."""

    def _make(overrides: list[str] | None = None, output_dir: Path | None = None) -> DictConfig:
        return compose_config(list(overrides or []), output_dir or tmp_path / "run")

    yield _make
    GlobalHydra.instance().clear()
