"""Process placement for multirun and multi-GPU jobs.

Two fixes that Hydra + Lightning need (see docs/architecture.md, "Sweeps and DDP"):

- Lightning's DDP launcher re-executes ``sys.argv`` for ranks ≥ 1. Under ``-m`` that re-runs the whole sweep in
  every child. ``use_job_command_for_ddp_children`` makes a child run exactly its parent's job instead: the job's
  own overrides, in RUN mode, in the job's output dir.
- Hydra's local launchers do not assign GPUs. ``claim_gpu_slot`` gives each worker process one GPU for its lifetime
  (an exclusive lock file per GPU), so ``launcher=local_gpus`` runs one cell per GPU.

A user's mistake (a bad config value, a missing data set or weights file) ends a single run with one line on stderr
and exit status 1, as Hydra's own errors for unknown options do; ``HYDRA_FULL_ERROR=1`` shows the traceback.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from lqf_exp.validation import ConfigError

log = logging.getLogger(__name__)

_held_slot: tuple[int, IO[str]] | None = None

# Errors the project raises on purpose with a message that names the value and the remedy: the traceback under them
# says nothing the message does not. FileNotFoundError: missing data roots, checkpoints and weights files.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, FileNotFoundError)


def job_subprocess_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command a DDP child rank runs: this job alone (not the sweep), writing into this job's dir."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    hydra_cfg = HydraConfig.get()
    command = [sys.executable, to_absolute_path(sys.argv[0]), *hydra_cfg.overrides.task]
    command += [
        f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"',
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",
        "hydra.mode=RUN",
    ]
    return command, get_original_cwd()


def use_job_command_for_ddp_children() -> None:
    """Install ``job_subprocess_command`` as Lightning's command for DDP child ranks."""
    from pytorch_lightning.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = job_subprocess_command


def claim_gpu_slot(count: int, lock_dir: str | Path) -> int:
    """Claim one of ``count`` GPU slots for this process and restrict CUDA to it; idempotent per process.

    With ``count`` workers, each holds a distinct slot for as long as it lives (the lock goes with the process), so
    the cells of a sweep run one per GPU. Must run before CUDA is initialized in this process.
    """
    global _held_slot
    if count < 1:
        raise ValueError(f"local_gpus.count must be >= 1, got {count}")
    if _held_slot is not None:
        return _held_slot[0]
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    for slot in range(count):
        handle = open(lock_dir / f"gpu{slot}.lock", "w")  # noqa: SIM115 - kept open: the lock lives with it
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _held_slot = (slot, handle)
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot)
        log.info("This worker runs its cells on GPU %d", slot)
        return slot
    raise RuntimeError(
        f"all {count} GPU slots in {lock_dir} are taken: run at most local_gpus.count jobs at once "
        "(hydra.launcher.n_jobs) and make local_gpus.count the number of GPUs"
    )


def run_job(cfg) -> float | None:  # noqa: ANN001 - a DictConfig, typed loosely to keep Hydra imports local
    """What ``run.py`` does for one job: place it, run it, and keep a sweep going when one cell fails.

    Returns the test accuracy (for Hydra sweepers), or None for a failed cell of a multirun; the cell's
    ``error.json`` says why and the report marks it.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lqf_exp.pipeline import run

    if cfg.get("local_gpus"):
        claim_gpu_slot(int(cfg.local_gpus.count), cfg.local_gpus.lock_dir)
    environment = dict(os.environ)
    try:
        return run(cfg).get("metrics", {}).get("test/acc")
    except Exception as error:
        in_sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        if in_sweep and cfg.get("continue_on_error", True):
            log.exception("This cell failed (see error.json in its dir); the other cells still run")
            return None
        if not in_sweep and isinstance(error, USER_ERRORS) and os.environ.get("HYDRA_FULL_ERROR") != "1":
            # SystemExit passes Hydra's handler, which would print the traceback; Python prints the text, exits 1.
            raise SystemExit(f"Error: {error} (HYDRA_FULL_ERROR=1 shows the traceback)") from None
        raise
    finally:
        _end_distributed_job(environment)


def _end_distributed_job(environment: dict[str, str]) -> None:
    """Close this job's DDP process group and drop the rank variables Lightning exported (LOCAL_RANK, ...), so the
    next job of a multirun in this process launches its own ranks instead of waiting for ones that never come."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key in set(os.environ) - set(environment):
        del os.environ[key]
    os.environ.update(environment)
