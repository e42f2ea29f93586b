"""What ``python -m lqf_exp.influence`` writes: ``influence.csv``, the test-prediction changes, a gallery of the most
and least informative training images, ``influence.json``, and the same to W&B when the run logged there."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import spearmanr
from torch import Tensor

from lqf_exp.data.torchvision_sets import labels_of
from lqf_exp.results import atomic_write_json
from lqf_exp.tracking import stable_run_id

from .compute import RunInfluence
from .run_dir import FinishedRun

log = logging.getLogger(__name__)

__all__ = ["CSV_FILE", "GALLERY_FILE", "SUMMARY_FILE", "write_outputs"]

CSV_FILE, GALLERY_FILE, SUMMARY_FILE = "influence.csv", "gallery.png", "influence.json"


def _rows(run: FinishedRun, result: RunInfluence, labels: list[int]) -> list[dict[str, Any]]:
    names = run.datamodule.class_names
    primary = "exact" if "exact" in result.val else "kfac"
    rows = []
    for i, label in enumerate(labels):
        row: dict[str, Any] = {"index": i, "label": label, "class": names[label],
                               "fsi": float(result.val[primary].informativeness[i])}
        for method, influence in result.val.items():
            row[f"fsi_{method}"] = float(influence.informativeness[i])
            row[f"leverage_{method}"] = float(influence.leverage_trace[i])
            row[f"self_influence_{method}"] = float(influence.self_influence[i])
        row["prediction_error"] = float(result.val[primary].residual[i].norm())
        rows.append(row)
    return rows


def _gallery(run: FinishedRun, scores: Tensor, labels: list[int], path: Path, count: int) -> None:
    """The ``count`` most and least informative training images, with class and F-SI."""
    order = torch.argsort(scores, descending=True).tolist()
    picks = {"most informative": order[:count], "least informative": order[::-1][:count]}
    names, dataset = run.datamodule.class_names, run.datamodule.train_dataset
    fig = Figure(figsize=(1.4 * count, 3.4))
    for row, (title, indices) in enumerate(picks.items()):
        for col, index in enumerate(indices):
            ax = fig.add_subplot(2, count, row * count + col + 1)
            image = dataset[index][0].float()  # type: ignore[index]
            image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
            ax.imshow(image.permute(1, 2, 0).numpy() if image.shape[0] == 3 else image[0].numpy(), cmap="gray")
            ax.set_title(f"{names[labels[index]]}\n{float(scores[index]):.3g}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.suptitle(f"Training samples by informativeness F-SI ({run.cfg.data.name})", fontsize=9)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def _log_to_wandb(run: FinishedRun, rows: list[dict[str, Any]], gallery: Path, summary: dict[str, Any]) -> bool:
    """Into the run's own W&B run (same id, resumed) when it had a W&B logger; False otherwise."""
    wandb_cfg = (run.cfg.get("logger") or {}).get("wandb")
    if not wandb_cfg:
        return False
    import wandb

    run_id = wandb_cfg.get("id") or stable_run_id(str(run.cfg.paths.output_dir))
    mode = "offline" if wandb_cfg.get("offline", True) else "online"
    wb = wandb.init(project=wandb_cfg.get("project"), entity=wandb_cfg.get("entity"), group=wandb_cfg.get("group"),
                    name=wandb_cfg.get("name"), id=run_id, dir=str(run.run_dir), resume="allow", mode=mode,
                    reinit=True)
    try:
        table = wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
        wb.log({"influence/table": table, "influence/gallery": wandb.Image(str(gallery))})
        wb.summary.update({f"influence/{k}": v for k, v in summary.items() if isinstance(v, int | float)})
    finally:
        wb.finish()
    return True


def write_outputs(run: FinishedRun, result: RunInfluence, out_dir: Path, gallery_count: int = 8) -> dict[str, Any]:
    """Write every output into ``out_dir``; returns the summary (also ``influence.json``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = labels_of(run.datamodule.train_dataset)
    rows = _rows(run, result, labels)
    tmp = out_dir / f".{CSV_FILE}.tmp"
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out_dir / CSV_FILE)
    for method, influence in result.test.items():
        torch.save({"change": influence.change.float(), "note": "[train, test, class]: f_w(x) - f_w-i(x)"},
                   out_dir / f"test_change_{method}.pt")
    primary = "exact" if "exact" in result.val else "kfac"
    _gallery(run, result.val[primary].informativeness, labels, out_dir / GALLERY_FILE, gallery_count)
    summary: dict[str, Any] = {
        "run_dir": run.run_dir.name, "train_size": len(labels), "val_size": int(result.val[primary].change.shape[1]),
        "test_size": int(result.test[primary].change.shape[1]), "weight_decay": run.weight_decay,
        "seconds": result.seconds, "primary": primary,
    }
    if len(result.val) == 2:
        rho = spearmanr(result.val["kfac"].informativeness.numpy(), result.val["exact"].informativeness.numpy())
        summary["spearman_fsi_kfac_vs_exact"] = float(rho.statistic)
    atomic_write_json(out_dir / SUMMARY_FILE, summary)
    summary["wandb"] = _log_to_wandb(run, rows, out_dir / GALLERY_FILE, summary)
    return summary
