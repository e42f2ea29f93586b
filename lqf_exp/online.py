"""On-line learning (paper Fig. 5), ``task=online``: the training set arrives in ``task.steps`` increments drawn
uniformly over classes; at step t the method trains on everything seen so far, warm-started from step t − 1
(LQF: δ_{t−1}, on the linearization at w0 with its probe head refitted to the data so far; fine-tuning: w_{t−1}),
and is compared with the paragon, the same recipe trained from scratch on the same data. Each fit stops by the
recipe's own rule (LQF: the solver's convergence rule; fine-tuning: its step budget with early stopping).

Writes ``online.csv``/``online.md``/``online.png`` and ``metrics.json`` (one entry per step) into the run directory,
logs one W&B/CSV run with a step per increment, and resumes after an interruption from the last finished step
(``online_state.pt``: the rows so far and the incremental model).
"""

from __future__ import annotations

import csv
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint

from lqf_exp.builders import build, build_module
from lqf_exp.data import ClassificationDataModule
from lqf_exp.methods import LQF, ClassifierModule
from lqf_exp.report.plots import curve_plot
from lqf_exp.report.provenance import result_header, run_command
from lqf_exp.results import METRICS_FILE, atomic_write_json
from lqf_exp.tracking import instantiate_collection

log = logging.getLogger(__name__)

__all__ = ["increments", "run_online"]

STATE_FILE = "online_state.pt"
MODES = ("incremental", "paragon")


def increments(labels: np.ndarray, steps: int, seed: int) -> list[list[int]]:
    """``steps`` disjoint parts of ``range(len(labels))``, each with (as nearly as possible) the same number of
    samples of every class, in a seeded random order."""
    if steps < 1 or steps > int(np.bincount(labels).min()):
        raise ValueError(f"task.steps={steps}: must be between 1 and the smallest class size "
                         f"({int(np.bincount(labels).min())}), so that every step sees every class")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(steps)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        for part, chunk in zip(parts, np.array_split(members, steps), strict=True):
            part.extend(int(i) for i in chunk)
    return [sorted(part) for part in parts]


def _float64(cfg: DictConfig) -> bool:
    """``trainer.precision=64-true``: data and module in float64 from the start, as :func:`lqf_exp.pipeline.run` makes
    them (Lightning casts only the training batches, after the module's setup hook has fitted its head)."""
    return str(cfg.trainer.get("precision")).startswith("64")


def _data(cfg: DictConfig, **kwargs: Any) -> ClassificationDataModule:
    return build(cfg.data, **kwargs, **({"dtype": "float64"} if _float64(cfg) else {}))


def _module(cfg: DictConfig, datamodule: ClassificationDataModule) -> ClassifierModule:
    module = build_module(cfg, datamodule)
    return module.double() if _float64(cfg) else module


def _data_upto(cfg: DictConfig, out: Path, parts: list[list[int]], t: int, size: int) -> ClassificationDataModule:
    seen = {i for part in parts[:t] for i in part}
    drop = out / "online" / f"unseen-step{t}.txt"
    drop.parent.mkdir(parents=True, exist_ok=True)
    drop.write_text("".join(f"{i}\n" for i in range(size) if i not in seen))
    datamodule = _data(cfg, drop=str(drop) if len(seen) < size else None)
    datamodule.setup("fit")
    return datamodule


def _fit(cfg: DictConfig, module: ClassifierModule, datamodule: ClassificationDataModule, out: Path) -> dict:
    # In-memory fits, tested on their final weights: no checkpoints (the run's state is online_state.pt).
    callbacks = [cb for cb in instantiate_collection(cfg.get("callbacks")) if not isinstance(cb, ModelCheckpoint)]
    if cfg.precond.get("callback"):
        callbacks.append(build(cfg.precond.callback))  # a fresh curvature estimate on the data seen so far
    trainer: pl.Trainer = build(cfg.trainer, callbacks=callbacks, logger=False, enable_checkpointing=False,
                                default_root_dir=str(out))
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - started
    tested = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    return {"test_err": 100 * (1 - float(tested["test/acc"])), "steps": trainer.global_step,
            "seconds": round(seconds, 2)}


def _warm_start(new: ClassifierModule, previous: ClassifierModule) -> None:
    with torch.no_grad():
        if isinstance(new, LQF):
            assert isinstance(previous, LQF)
            for target, source in zip(new.linearized.delta_list(), previous.linearized.delta_list(), strict=True):
                target.copy_(source)
        else:
            new.net.load_state_dict(previous.net.state_dict())


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    curves = {mode: [(r["samples"], r["test_err"], 0.0) for r in rows if r["mode"] == mode] for mode in MODES}
    curve_plot(path, curves, title, "training samples seen", "test error (%)")


def _write(out: Path, rows: list[dict[str, Any]], title: str, header: list[str]) -> None:
    with (out / "online.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, out / "online.png", title)
    lines = ["| step | samples | incremental err (%) | paragon err (%) | gap | incremental steps | paragon steps |",
             "|---|---|---|---|---|---|---|"]
    for t in sorted({r["step"] for r in rows}):
        inc, par = (next((r for r in rows if r["step"] == t and r["mode"] == m), None) for m in MODES)
        if inc and par:
            lines.append(f"| {t} | {inc['samples']} | {inc['test_err']:.2f} | {par['test_err']:.2f} | "
                         f"{inc['test_err'] - par['test_err']:+.2f} | {inc['steps']} | {par['steps']} |")
    (out / "online.md").write_text(f"# {title}\n\n" + "\n".join([*header, "", *lines]) + "\n\n![online](online.png)\n")


def run_online(cfg: DictConfig, output_dir: Path, factors: dict[str, Any], loggers: list) -> dict[str, Any]:
    """The on-line protocol of ``cfg`` (``task=online``); returns (and writes) ``metrics.json``'s payload."""
    started = time.time()
    full = _data(cfg)
    full.setup("fit")
    labels = np.array([int(full.train_dataset[i][1]) for i in range(len(full.train_dataset))])
    parts = increments(labels, int(cfg.task.steps), int(cfg.seed))
    rows: list[dict[str, Any]] = []
    previous: ClassifierModule | None = None
    state_path = output_dir / STATE_FILE
    if state_path.is_file() and cfg.get("resume", True):
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        rows = list(state["rows"])
        previous = _module(cfg, full)
        previous.load_state_dict(state["incremental"], strict=False)
        log.info("online: resuming after step %d", rows[-1]["step"])
    title = f"On-line learning, {full.name}, {factors.get('recipe') or factors.get('method')}"
    # Once per run, not per step: it asks git for the commit and reads the run's Hydra overrides.
    header = result_header([run_command(output_dir)
                            or "python run.py task=online … (overrides not recorded: no .hydra/)"])
    for t in range(len({r["step"] for r in rows}) + 1, len(parts) + 1):
        datamodule = _data_upto(cfg, output_dir, parts, t, len(labels))
        samples = len(datamodule.train_dataset)  # type: ignore[arg-type]
        pl.seed_everything(int(cfg.seed) + t, workers=True)
        incremental = _module(cfg, datamodule)
        if previous is not None:
            _warm_start(incremental, previous)
        step_rows = [{"step": t, "samples": samples, "mode": "incremental",
                      **_fit(cfg, incremental, datamodule, output_dir)}]
        pl.seed_everything(int(cfg.seed) + t, workers=True)
        paragon = _module(cfg, datamodule)
        step_rows.append({"step": t, "samples": samples, "mode": "paragon",
                          **_fit(cfg, paragon, datamodule, output_dir)})
        rows += step_rows
        previous = incremental
        log.info("online step %d/%d (%d samples): incremental %.2f%%, paragon %.2f%% test error", t, len(parts),
                 samples, step_rows[0]["test_err"], step_rows[1]["test_err"])
        for logger in loggers:
            logger.log_metrics({f"online/{r['mode']}_test_err": r["test_err"] for r in step_rows}
                               | {"online/samples": samples}, step=t)
            logger.save()  # the fits have no logger: this run's own loggers flush nothing unless told
        torch.save({"rows": rows, "incremental": incremental.state_dict(), "paragon": paragon.state_dict()},
                   state_path)
        _write(output_dir, rows, title, header)
    final = {m: next(r for r in reversed(rows) if r["mode"] == m) for m in MODES}
    gaps = [r["test_err"] - p["test_err"] for r, p in zip(rows[0::2], rows[1::2], strict=True)]
    payload = {
        "status": "finished", "run_name": cfg.get("run_name"), "factors": factors,
        "metrics": {"test/acc": 1 - final["incremental"]["test_err"] / 100,
                    "test/acc_paragon": 1 - final["paragon"]["test_err"] / 100},
        "online": rows, "max_gap_to_paragon": max(gaps), "mean_gap_to_paragon": statistics.fmean(gaps),
        "data": full.describe(), "duration_s": round(time.time() - started, 2), "output_dir": str(output_dir),
    }
    atomic_write_json(output_dir / METRICS_FILE, payload)
    print(f"On-line learning: {output_dir / 'online.md'}; largest gap to the paragon {max(gaps):+.2f} points")
    return payload
