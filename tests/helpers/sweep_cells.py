"""Synthetic sweep cells: what a finished or failed run leaves behind, with every number known by construction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BASE = {
    "task": "finetune",
    "recipe": None,
    "model": "small_resnet",
    "weights": "packaged",
    "activation": "leaky_relu",
    "loss": "mse",
    "precond": "kfac",
    "method": "lqf",
    "linearize": "all",
    "data": "digits",
    "shots": None,
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "batch_size": 64,
    "seed": 0,
}


def write_cell(
    root: Path, name: str, err: float | None = None, val: float = 0.8, error: str | None = None,
    steps: int | None = None, **factors: Any,
) -> Path:
    """A finished cell with test error ``err`` (%) (and ``steps`` optimizer steps when given), or a failed one when
    ``error`` is given."""
    cell = root / name
    cell.mkdir(parents=True)
    all_factors = {**BASE, **factors}
    if error is not None:
        payload = {"status": "failed", "error": error, "traceback": "Traceback ...\n" + error, "factors": all_factors}
        (cell / "error.json").write_text(json.dumps(payload))
    else:
        metrics = {"test/acc": 1 - err / 100, "test/loss": 0.5, "val/acc": val - 0.01, "val/acc_best": val}
        payload = {
            "status": "finished",
            "run_name": name,
            "factors": all_factors,
            "metrics": metrics,
            "epochs": 3,
            "duration_s": 1.5,
            "output_dir": str(cell),
        }
        if steps is not None:
            payload["steps"] = steps
        (cell / "metrics.json").write_text(json.dumps(payload))
    return cell
