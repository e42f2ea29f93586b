"""``run(cfg)``: one job, from a composed config to ``metrics.json``. ``run.py`` is a thin Hydra wrapper around it."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from lqf_exp.builders import build, build_module, run_factors
from lqf_exp.code_version import code_version
from lqf_exp.data import ClassificationDataModule
from lqf_exp.methods import ClassifierModule
from lqf_exp.models import save_network_checkpoint
from lqf_exp.online import run_online
from lqf_exp.results import (
    FINAL_CHECKPOINT,
    METRICS_FILE,
    atomic_write_json,
    atomic_write_text,
    read_metrics,
    write_error,
    write_test_predictions,
)
from lqf_exp.solvers import DivergenceError
from lqf_exp.tracking import build_loggers, finishing_wandb, instantiate_collection, log_config
from lqf_exp.validation import validate_config

log = logging.getLogger(__name__)

SOURCE_CHECKPOINT = "source_model.pt"


def _last_checkpoint(output_dir: Path) -> str | None:
    """``checkpoints/last.ckpt`` if it loads; one cut short by a kill is set aside (``last.ckpt.corrupt``) and the
    run starts over rather than failing."""
    last = output_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    try:
        torch.load(last, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is treated the same way
        aside = last.with_name("last.ckpt.corrupt")
        last.replace(aside)
        log.warning("%s cannot be loaded (%s); it was moved to %s and the run starts over", last, error, aside)
        return None
    return str(last)


def _final_metrics(fit_metrics: dict[str, Any], test_metrics: dict[str, Any]) -> dict[str, float]:
    merged = {**fit_metrics, **test_metrics}
    return {key: float(value) for key, value in sorted(merged.items()) if key.startswith(("val/", "test/"))}


def solve_status_line(solve: dict[str, Any]) -> str:
    """One line on how an LQF solve ended; a capped solve says so with its estimated gap and gradient ratio."""
    unit = "iterations on the Jacobian cache" if solve.get("in_memory") else "passes"
    ratio = solve.get("grad_ratio")
    ratio_text = "unknown" if ratio is None else f"{ratio:.1e}"
    if solve.get("status") == "capped":
        gap = solve.get("estimated_gap")
        return (f"NOT CONVERGED: the LQF solve stopped at its cap after {solve.get('epochs')} {unit} (estimated gap "
                f"{'unknown' if gap is None else f'{gap:.1e}'}, ‖∇L‖/‖∇L(0)‖ = {ratio_text}); raise "
                "method.stop.max_epochs or see benchmarks/README.md")
    how = "closed form (dual system)" if solve.get("exact") else f"{solve.get('epochs')} {unit}"
    return (f"LQF solve {solve.get('status')}: {how}, λ = {solve.get('weight_decay')}, "
            f"‖∇L‖/‖∇L(0)‖ = {ratio_text}")


def _print_summary(factors: dict[str, Any], metrics: dict[str, float], output_dir: Path,
                   solve: dict[str, Any] | None = None) -> None:
    rows = [("run", " ".join(f"{k}={v}" for k, v in factors.items()))]
    rows += [(key, f"{value:.4f}") for key, value in metrics.items()]
    width = max(len(key) for key, _ in rows)
    print("\n".join(f"{key:<{width}}  {value}" for key, value in rows))
    if solve:
        print(solve_status_line(solve))
    if "test/acc" in metrics:
        print(f"Final test accuracy: {metrics['test/acc']:.4f}   (results in {output_dir / METRICS_FILE})")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one configuration; return (and write) its metrics. Idempotent per output dir."""
    validate_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    factors = run_factors(cfg)
    if cfg.get("skip_finished", True) and (previous := read_metrics(output_dir)) is not None:
        log.info("%s already holds a finished run; skipping it (skip_finished=false re-runs it)", output_dir)
        return previous
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    atomic_write_text(output_dir / "config_resolved.yaml", OmegaConf.to_yaml(resolved))
    loggers = build_loggers(cfg, str(output_dir))
    with finishing_wandb(loggers):
        try:
            if cfg.task.name == "online":
                return run_online(cfg, output_dir, factors, loggers)
            return _train_and_test(cfg, output_dir, factors, resolved, loggers)
        except DivergenceError:
            raise  # recorded as a result in metrics.json, not as an error
        except Exception as error:
            write_error(output_dir, error, factors)
            raise


def _train_and_test(
    cfg: DictConfig, output_dir: Path, factors: dict[str, Any], resolved: dict[str, Any], loggers: list
) -> dict[str, Any]:
    started = time.time()
    pl.seed_everything(cfg.seed, workers=True)
    # trainer.precision=64-true: Lightning makes the module float64 only after its setup hook (LQF fits its head
    # there) and casts only the training batches, so the data and the module are float64 from the start.
    float64 = str(cfg.trainer.get("precision")).startswith("64")
    datamodule: ClassificationDataModule = build(cfg.data, **({"dtype": "float64"} if float64 else {}))
    datamodule.setup("fit")  # bad roots and impossible `shots` fail here, before any model is built
    module = build_module(cfg, datamodule)
    if float64:
        module.double()
    callbacks = instantiate_collection(cfg.get("callbacks"))
    if cfg.precond.get("callback"):
        callbacks.append(build(cfg.precond.callback))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    log_config(loggers, {**resolved, "factors": factors, "data_summary": datamodule.describe()})

    resume_from = _last_checkpoint(output_dir) if cfg.get("resume", True) else None
    if resume_from:
        log.info("Resuming from %s", resume_from)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    except DivergenceError as error:
        if trainer.is_global_zero:  # one writer; the other ranks need not ask git for the commit either
            _record_divergence(output_dir, factors, module, error, trainer, _run_record(cfg, output_dir, started))
        raise
    fit_metrics = dict(trainer.callback_metrics)

    checkpoint = next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor), None)
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    tested = best if module.test_checkpoint == "best" else None  # None: the weights at the end of fit
    test_results = trainer.test(module, datamodule=datamodule, ckpt_path=tested, weights_only=True, verbose=False)
    metrics = _final_metrics(fit_metrics, test_results[0] if test_results else {})
    if trainer.world_size == 1 and module.test_predictions:  # under DDP each rank saw a padded share of the set
        write_test_predictions(output_dir, torch.cat(module.test_labels).tolist(),
                               torch.cat(module.test_predictions).tolist())
    final = None
    if tested is None:  # the tested weights are the end of fit: keep them (δ, head, K-FAC state) for later analysis
        final = output_dir / "checkpoints" / FINAL_CHECKPOINT
        trainer.save_checkpoint(final, weights_only=False)

    if cfg.task.name == "pretrain" and trainer.is_global_zero:
        _export_source_model(cfg, module, metrics, output_dir)
    payload = {
        "status": "finished",
        "run_name": cfg.get("run_name"),
        "factors": factors,
        "metrics": metrics,
        "tested_checkpoint": tested or "final",
        "best_checkpoint": best,
        "final_checkpoint": None if final is None else str(final),
        "data": datamodule.describe(),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        **_run_record(cfg, output_dir, started, ask_git=trainer.is_global_zero),  # rank 0 alone writes it
    }
    payload.update(module.run_summary())
    if trainer.is_global_zero:
        atomic_write_json(output_dir / METRICS_FILE, payload)
        _print_summary(factors, metrics, output_dir, payload.get("solver"))
    return payload


def _run_record(cfg: DictConfig, output_dir: Path, started: float, ask_git: bool = True) -> dict[str, Any]:
    """What every metrics.json says about its run, finished or diverged: how long, where, on what and by which code
    (the commit: reports count their cells by it; None where ``ask_git`` is false, on ranks that write nothing)."""
    return {
        "duration_s": round(time.time() - started, 2),
        "output_dir": str(output_dir),
        "device": "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu",
        "code": code_version() if ask_git else None,
    }


def _record_divergence(
    output_dir: Path, factors: dict[str, Any], module: ClassifierModule, error: DivergenceError, trainer: pl.Trainer,
    record: dict[str, Any],
) -> None:
    """A diverged solve is a result, not a crash: metrics.json says so (sweeps and reports mark the cell)."""
    payload = {
        "status": "diverged",
        "error": str(error),
        "run_name": None,
        "factors": factors,
        "metrics": {},
        **module.run_summary(),
        "epochs": trainer.current_epoch,
        **record,
    }
    atomic_write_json(output_dir / METRICS_FILE, payload)
    print(f"DIVERGED: {error}\n(results in {output_dir / METRICS_FILE})")


def _export_source_model(
    cfg: DictConfig, module: ClassifierModule, metrics: dict[str, float], output_dir: Path
) -> None:
    meta = {"data": cfg.data.name, "classes": list(cfg.data.get("classes") or []), "test_acc": metrics.get("test/acc")}
    targets = [output_dir / SOURCE_CHECKPOINT]
    if cfg.task.get("export_path"):
        targets.append(Path(cfg.task.export_path))
    for path in targets:
        save_network_checkpoint(module.net, path, arch=cfg.model.arch, activation_name=cfg.activation.name, meta=meta)
        log.info("Saved the source network to %s", path)
