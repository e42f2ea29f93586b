"""The real command line, in subprocesses: a single run, and a 2-job multirun with W&B offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO_ROOT

pytestmark = pytest.mark.slow

FAST = ["debug=smoke", "model.weights=null", "data.batch_size=16"]


def run_cli(args: list[str], tmp_path: Path, wandb_mode: str = "disabled") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WANDB_MODE": wandb_mode, "WANDB_DIR": str(tmp_path), "WANDB_CACHE_DIR": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "run.py", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_single_run_prints_and_saves_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "single"
    result = run_cli([*FAST, f"hydra.run.dir={out}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"Final test accuracy: {metrics['metrics']['test/acc']:.4f}" in result.stdout
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "config_resolved.yaml").is_file()


def test_bad_value_fails_before_training(tmp_path: Path) -> None:
    result = run_cli([*FAST, "optim.lr=-1", f"hydra.run.dir={tmp_path / 'bad'}"], tmp_path)
    assert result.returncode != 0
    assert "invalid config value optim.lr=-1" in result.stderr
    assert "Epoch 0" not in result.stdout + result.stderr


def test_multirun_writes_one_wandb_run_per_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(
        ["-m", *FAST, "logger=wandb", "activation=relu,leaky_relu", f"hydra.sweep.dir={sweep}"],
        tmp_path,
        wandb_mode="offline",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_ids = set()
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["status"] == "finished"
        offline_runs = list((sweep / job / "wandb").glob("offline-run-*"))
        assert len(offline_runs) == 1, offline_runs
        run_ids.add(offline_runs[0].name.rsplit("-", 1)[-1])
    assert len(run_ids) == 2
    activations = {json.loads((sweep / j / "metrics.json").read_text())["factors"]["activation"] for j in "01"}
    assert activations == {"relu", "leaky_relu"}
