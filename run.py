"""Command-line entry point: ``python run.py [group=option ...] [-m]``. All the work is in ``lqf_exp.pipeline``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lqf_exp.config import register_resolvers
from lqf_exp.pipeline import run

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one job; return the test accuracy so that Hydra sweepers can optimize it."""
    metrics = run(cfg).get("metrics", {})
    return metrics.get("test/acc")


if __name__ == "__main__":
    main()
