"""trainer=ddp from the CLI on CPU (2 gloo ranks): a single run, and a 2-job multirun in which no child rank
re-runs the sweep and each job writes exactly one output dir and one W&B run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .test_cli import FAST, run_cli

pytestmark = pytest.mark.slow

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=wandb"]


def offline_runs(job_dir: Path) -> list[Path]:
    return sorted((job_dir / "wandb").glob("offline-run-*"))


def test_ddp_single_run(tmp_path: Path) -> None:
    out = tmp_path / "single"
    result = run_cli([*FAST, *DDP, f"hydra.run.dir={out}"], tmp_path, wandb_mode="offline")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["factors"]["method"] == "lqf"  # the Jacobian cache serves one process: off, and why, under DDP
    cache = metrics["solver"]["jacobian_cache"]
    assert not cache["used"] and "data parallelism" in cache["why"] and not metrics["solver"]["in_memory"]
    assert (out / "train_ddp_process_1.log").is_file()  # rank 1 ran, in this run's dir
    assert len(offline_runs(out)) == 1


def test_ddp_under_multirun(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", *FAST, *DDP, "seed=0,1", f"hydra.sweep.dir={sweep}"], tmp_path, wandb_mode="offline")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Launching 2 jobs locally") + result.stderr.count("Launching 2 jobs locally") == 1
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    seeds = set()
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        seeds.add(metrics["factors"]["seed"])
        assert (sweep / job / "train_ddp_process_1.log").is_file()
        assert len(offline_runs(sweep / job)) == 1
    assert seeds == {0, 1}
    assert not any(tmp_path.glob("**/multirun.yaml")) or len(list(tmp_path.glob("**/multirun.yaml"))) == 1
