"""A run directory written before the linearized network became a dual module tree (commit d0459cf: per-call
``forward`` patching) still loads and predicts what it recorded.

``tests/data/pre_dual_run`` was written by that commit's ``python run.py logger=none data.shots=3 data.batch_size=16
model.weights=null method.weight_decay=1e-2`` (digits, every layer linearized); only its final checkpoint is kept.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lqf_exp.influence.run_dir import load_finished_run

OLD_RUN = Path(__file__).parent / "data" / "pre_dual_run"


def test_a_run_directory_of_the_patching_code_loads_and_predicts_what_it_recorded(tmp_path: Path) -> None:
    run_dir = shutil.copytree(OLD_RUN, tmp_path / "run")  # the recorded paths point elsewhere: the loader falls back
    run = load_finished_run(run_dir)
    net = run.module.linearized
    assert any(bool(d.detach().any()) for d in net.delta_list())  # δ came from the checkpoint
    run.datamodule.setup("test")
    correct = total = 0
    with torch.no_grad():
        for x, y in DataLoader(run.datamodule.test_dataset, batch_size=128):
            correct += int((net(x).argmax(1) == y).sum())
            total += len(y)
    assert total == len(run.datamodule.test_dataset)
    # the same images right (the metric was recorded in float32)
    assert correct / total == pytest.approx(run.metrics["metrics"]["test/acc"], abs=1e-6)
