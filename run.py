"""Command-line entry point: ``python run.py [group=option ...] [-m]``. The work is in ``lqf_exp.pipeline.run``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lqf_exp.config import register_resolvers
from lqf_exp.launch import run_job, use_job_command_for_ddp_children

register_resolvers()
use_job_command_for_ddp_children()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one job; return its test accuracy so that Hydra sweepers can optimize it."""
    return run_job(cfg)


if __name__ == "__main__":
    main()
