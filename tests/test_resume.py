"""A killed LQF run resumes to the answer of an uninterrupted one (real processes, SIGKILL mid-run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lqf_exp.pipeline import _last_checkpoint

from .conftest import REPO_ROOT

pytestmark = pytest.mark.slow

# A small solve that runs its full 6 passes (the tolerance is unreachable) with a fixed λ, through network passes
# (a solve on the Jacobian cache ends within its first epoch: nothing to kill mid-way).
ARGS = [
    "logger=csv", "method.jacobian_cache_gb=null", "data.shots=10", "data.batch_size=32", "method.weight_decay=1e-2",
    "method.stop.rel_gap=1e-9", "method.stop.max_epochs=6", "trainer.max_epochs=6",
    "callbacks.progress_bar.refresh_rate=0",
]  # fmt: skip


def launch(out: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "run.py", *ARGS, f"hydra.run.dir={out}"]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def checkpoint_epoch(out: Path) -> int:
    try:
        return int(torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["epoch"])
    except Exception:  # noqa: BLE001 - not written yet, or being written
        return -1


def test_killed_run_resumes_to_the_uninterrupted_answer(tmp_path: Path) -> None:
    whole = launch(tmp_path / "whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-3000:]

    out = tmp_path / "killed"
    victim = launch(out)
    deadline = time.time() + 600
    while checkpoint_epoch(out) < 2 and victim.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (out / "metrics.json").exists()

    resumed = launch(out)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    first, second = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "whole", out))
    assert second["solver"]["epochs"] == first["solver"]["epochs"] == 6
    assert second["solver"]["objective"] == pytest.approx(first["solver"]["objective"], rel=1e-9)
    assert second["metrics"]["val/acc_best"] == first["metrics"]["val/acc_best"]
    assert second["metrics"]["test/acc"] == first["metrics"]["test/acc"]


def test_a_checkpoint_cut_short_is_set_aside(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "last.ckpt").write_bytes(b"PK\\x03\\x04 truncated")
    assert _last_checkpoint(tmp_path) is None
    assert (checkpoints / "last.ckpt.corrupt").is_file() and not (checkpoints / "last.ckpt").exists()
