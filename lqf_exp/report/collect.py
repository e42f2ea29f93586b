"""Find the cells (jobs) of a sweep directory and read what each one left behind."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METRICS_FILE = "metrics.json"
ERROR_FILE = "error.json"
CONFIG_FILES = ("config_resolved.yaml", ".hydra/config.yaml")
FACTOR_KEYS = (
    "task", "recipe", "model", "weights", "pooling", "activation", "loss", "target_scale", "precond", "method",
    "linearize", "bn", "data", "shots", "solver", "lambda_rule", "lr", "momentum", "weight_decay", "batch_size", "seed",
)  # fmt: skip
# Directories that never hold a cell but can be large (checkpoints, W&B's local files).
_SKIP_DIRS = {".hydra", "checkpoints", "wandb", "lightning_logs", "__pycache__", ".git"}
# Class names of conf/loss and conf/method targets, for cells that only left a config behind.
_LOSS_KINDS = {"CrossEntropyLoss": "ce", "ScaledMSELoss": "mse"}
_METHOD_NAMES = {"FineTune": "finetune", "LQF": "lqf", "Probe": "probe"}


@dataclass
class Cell:
    """One job of a sweep: its factors, its final metrics, and whether it finished, diverged (an LQF solve whose
    objective blew up: a result without metrics), failed or is missing."""

    path: Path
    name: str  # path relative to the sweep directory
    status: str  # "finished" | "diverged" | "failed" | "missing"
    factors: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    epochs: int | None = None
    steps: int | None = None  # optimizer steps (LQF: solver steps; 0 for a closed-form fit)
    duration_s: float | None = None
    device: str | None = None  # "cpu" or "cuda": where it ran (the report header counts them; not a CSV column)
    code: dict[str, Any] | None = None  # metrics.json's code version (the header counts cells by it; not a CSV column)
    solver: dict[str, Any] = field(default_factory=dict)  # an LQF solve's record: objective, passes, chosen λ

    def get(self, key: str) -> Any:
        return self.factors.get(key)

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def test_err(self) -> float | None:
        """Test error in %, 100·(1 − test/acc)."""
        acc = self.metrics.get("test/acc")
        return None if acc is None else 100.0 * (1.0 - acc)

    @property
    def val_acc(self) -> float | None:
        """The validation accuracy that model selection uses: the best epoch's if logged, else the last one's."""
        return self.metrics.get("val/acc_best", self.metrics.get("val/acc"))

    @property
    def error_line(self) -> str:
        """The one-line reason this cell has no result."""
        lines = (self.error or "").strip().splitlines()
        if lines:
            return ("DIVERGED: " if self.status == "diverged" else "") + lines[0]
        return "unknown error" if self.status in ("failed", "diverged") else ""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    # An unresolved interpolation in .hydra/config.yaml tells nothing about the value.
    return None if isinstance(tree, str) and "${" in tree else tree


def _class_name(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1] if target else ""


def factors_from_config(cell_dir: Path) -> dict[str, Any]:
    """Best-effort factors of a cell that has a config but no json yet (running, killed or never started)."""
    cfg: dict[str, Any] = {}
    for name in CONFIG_FILES:
        try:
            loaded = yaml.safe_load((cell_dir / name).read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(loaded, dict):
            cfg = loaded
            break
    try:
        hydra_cfg = yaml.safe_load((cell_dir / ".hydra" / "hydra.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        hydra_cfg = {}
    choices = _lookup(hydra_cfg, "hydra.runtime.choices") or {}
    loss = choices.get("loss") or _LOSS_KINDS.get(_class_name(_lookup(cfg, "loss._target_")))
    method = _METHOD_NAMES.get(_class_name(_lookup(cfg, "method._target_"))) or choices.get("method")
    return {
        "task": _lookup(cfg, "task.name"),
        "recipe": _lookup(cfg, "recipe"),
        "model": _lookup(cfg, "model.arch"),
        "weights": _lookup(cfg, "model.weights"),
        "pooling": _lookup(cfg, "model.pooling") or "avg",
        "bn": _lookup(cfg, "method.bn"),
        "activation": _lookup(cfg, "activation.name"),
        "loss": loss,
        "target_scale": _lookup(cfg, "loss.target_scale"),
        "precond": _lookup(cfg, "precond.name"),
        "method": method,
        "linearize": _lookup(cfg, "method.linearize"),
        "data": _lookup(cfg, "data.name"),
        "shots": _lookup(cfg, "data.shots"),
        "solver": choices.get("solver") if method == "lqf" else None,
        "lambda_rule": (_lookup(cfg, "method.weight_decay_selection.rule")
                        if method == "lqf" and _lookup(cfg, "method.weight_decay") == "auto" else None),
        "lr": _lookup(cfg, "method.solver.lr") if method == "lqf" else _lookup(cfg, "method.optimizer.lr"),
        "momentum": (_lookup(cfg, "method.solver.momentum") if method == "lqf"
                     else _lookup(cfg, "method.optimizer.momentum")),
        "weight_decay": (_lookup(cfg, "method.weight_decay") if method == "lqf"
                         else _lookup(cfg, "method.optimizer.weight_decay")),
        "batch_size": _lookup(cfg, "data.batch_size"),
        "seed": _lookup(cfg, "seed"),
    }


def _with_bn(factors: dict[str, Any], cell_dir: Path) -> dict[str, Any]:
    """Runs made before ``bn`` was a factor: take it from the cell's config."""
    if "bn" not in factors:
        factors["bn"] = factors_from_config(cell_dir).get("bn")
    return factors


def _read_cell(cell_dir: Path, sweep_dir: Path) -> Cell | None:
    name = cell_dir.relative_to(sweep_dir).as_posix() or "."
    has_config = any((cell_dir / c).is_file() for c in CONFIG_FILES)
    metrics_path, error_path = cell_dir / METRICS_FILE, cell_dir / ERROR_FILE
    if not (metrics_path.is_file() or error_path.is_file() or has_config):
        return None
    payload = _read_json(metrics_path) if metrics_path.is_file() else None
    # A finished metrics.json wins over an error.json left by an earlier, failed attempt of the same cell.
    if payload is not None and payload.get("status") == "finished":
        factors = _with_bn(dict(payload.get("factors") or {}), cell_dir)
        return Cell(
            path=cell_dir,
            name=name,
            status="finished",
            factors=factors,
            metrics={k: float(v) for k, v in (payload.get("metrics") or {}).items() if isinstance(v, (int, float))},
            epochs=payload.get("epochs"),
            steps=payload.get("steps"),
            duration_s=payload.get("duration_s"),
            device=payload.get("device"),
            code=payload.get("code"),
            solver=dict(payload.get("solver") or {}),
        )
    if payload is not None and payload.get("status") == "diverged":
        factors = _with_bn(dict(payload.get("factors") or {}), cell_dir)
        return Cell(cell_dir, name, "diverged", factors, error=str(payload.get("error") or "diverged"),
                    epochs=payload.get("epochs"), steps=payload.get("steps"), duration_s=payload.get("duration_s"),
                    device=payload.get("device"), code=payload.get("code"))
    failure = _read_json(error_path) if error_path.is_file() else None
    if failure is not None:
        factors = _with_bn(dict(failure.get("factors") or {}) or factors_from_config(cell_dir), cell_dir)
        return Cell(cell_dir, name, "failed", factors, error=str(failure.get("error") or "unknown error"),
                    code=failure.get("code"))
    if metrics_path.is_file() or error_path.is_file():
        note = "unreadable or unfinished " + (METRICS_FILE if metrics_path.is_file() else ERROR_FILE)
    else:
        note = "missing (no metrics.json yet: running or not started)"
    factors = (payload or {}).get("factors") or factors_from_config(cell_dir)
    return Cell(cell_dir, name, "missing", dict(factors), error=note)


def load_cells(sweep_dir: str | os.PathLike[str]) -> list[Cell]:
    """Every cell under ``sweep_dir`` (at any depth), sorted by path; raises if the directory does not exist."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory {root} does not exist")
    cells: list[Cell] = []
    for current, dirs, _files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        cell = _read_cell(Path(current), root)
        if cell is not None:
            for key in FACTOR_KEYS:
                cell.factors.setdefault(key, None)
            # Older runs wrote class names (ScaledMSELoss, FineTune) where newer ones write the short names.
            cell.factors["loss"] = _LOSS_KINDS.get(cell.factors["loss"], cell.factors["loss"])
            cell.factors["method"] = _METHOD_NAMES.get(cell.factors["method"], cell.factors["method"])
            cells.append(cell)
    return sorted(cells, key=lambda c: c.name)
