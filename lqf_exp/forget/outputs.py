"""The new run directory of a forgetting: a finished LQF run like any other (config, final checkpoint,
``metrics.json``) plus the index file, a ``forget`` entry and the certificate, written whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from torch import Tensor

from lqf_exp.delta_layout import unflatten
from lqf_exp.influence import FinishedRun
from lqf_exp.influence.run_dir import CONFIG_FILE, Scores, load_final_checkpoint
from lqf_exp.results import FINAL_CHECKPOINT, METRICS_FILE, atomic_file, atomic_write_json, atomic_write_text

__all__ = ["CERTIFICATE_FILE", "DROP_FILE", "split_metrics", "staged_directory", "write_run"]

DROP_FILE = "drop.txt"  # the index file as given (or the class's list), relative to the run's training set
DATA_DROP_FILE = "data_drop.txt"  # what data.drop reads when the run had dropped samples already (both removals)
CERTIFICATE_FILE = "certificate.json"


def split_metrics(val: Scores, test: Scores) -> dict[str, float]:
    """``metrics.json``'s ``metrics`` entry, the keys a run writes."""
    return {"test/acc": test.acc, "test/loss": test.loss, "test/samples": float(test.samples), "val/acc": val.acc,
            "val/acc_best": val.acc, "val/loss": val.loss, "val/samples": float(val.samples)}


@contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """A scratch directory beside ``out`` that becomes ``out`` on success and is removed on any error: a reader
    (or a failed command) never sees half a run."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        yield stage
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _config(run: FinishedRun, out: Path, drop_path: Path) -> dict[str, Any]:
    cfg = OmegaConf.to_container(run.cfg, resolve=False)
    assert isinstance(cfg, dict)
    cfg["paths"]["output_dir"] = str(out)
    cfg["data"]["drop"] = str(drop_path)
    cfg["method"]["weight_decay"] = run.weight_decay  # λ was the run's, whatever chose it: only the data change
    return cfg


def _overrides(run: FinishedRun, drop_path: Path) -> list[str] | None:
    """The run's command-line overrides plus the data and λ of the new run (``python run.py <these>`` is the full
    retrain), or None for a run not made by ``python run.py``."""
    path = run.run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    pinned = {"data.drop", "method.weight_decay"}
    kept = [o for o in (yaml.safe_load(path.read_text()) or []) if o.split("=", 1)[0].lstrip("+~") not in pinned]
    return kept + [f"data.drop={drop_path}", f"method.weight_decay={run.weight_decay}"]


def write_run(stage: Path, out: Path, run: FinishedRun, delta: Tensor, removal_text: str,
              data_drop: str | None, metrics: dict[str, float], forget: dict[str, Any],
              solver: dict[str, Any]) -> dict[str, Any]:
    """Write the new run into ``stage`` (paths inside name ``out``, where it will be); returns metrics.json's payload.

    The checkpoint is the run's own with δ replaced (and the head, when ``run.module`` had it refitted); its K-FAC
    state is the run's (factors estimated with the removed samples: the note in ``forget`` says so).
    """
    (stage / DROP_FILE).write_text(removal_text)
    drop_name = DROP_FILE
    if data_drop is not None:
        (stage / DATA_DROP_FILE).write_text(data_drop)
        drop_name = DATA_DROP_FILE
    drop_path = out / drop_name
    atomic_write_text(stage / CONFIG_FILE, OmegaConf.to_yaml(_config(run, out, drop_path)))
    overrides = _overrides(run, drop_path)
    if overrides is not None:
        atomic_write_text(stage / ".hydra" / "overrides.yaml", yaml.safe_dump(overrides))
    checkpoint = load_final_checkpoint(run)
    module = run.module
    net = module.linearized
    state = checkpoint["state_dict"]
    own = module.state_dict()
    for key, value in zip(net.deltas.keys(), unflatten(delta, net.delta_list()), strict=True):
        entry = f"net.deltas.{key}"
        state[entry] = value.to(state[entry].dtype).clone()
    for key in (f"net.net.{net.head_name}.weight", f"net.net.{net.head_name}.bias"):
        state[key] = own[key].to(state[key].dtype).clone()
    solve = checkpoint.setdefault("lqf_solve", {})
    solve.update({"weight_decay": run.weight_decay, "head": dict(module.head_record), "forget": forget})
    final = out / "checkpoints" / FINAL_CHECKPOINT
    with atomic_file(stage / "checkpoints" / FINAL_CHECKPOINT, "wb") as handle:
        torch.save(checkpoint, handle)
    data = dict(run.metrics.get("data") or {})
    data.update({"dropped": drop_name, "train_size": forget["train_size"]})
    payload = {**run.metrics, "status": "finished", "metrics": metrics, "tested_checkpoint": "final",
               "best_checkpoint": None, "final_checkpoint": str(final), "data": data, "output_dir": str(out),
               "duration_s": forget["seconds"], "solver": solver, "forget": forget}
    atomic_write_json(stage / CERTIFICATE_FILE, forget["certificate"])
    atomic_write_json(stage / METRICS_FILE, payload)
    return payload
