"""How far each LQF solve of a sweep moved from where it started, the probe (δ = 0: w0 with its fitted head):
‖δ‖ against ‖w0‖ of the linearized weights, and the validation and test accuracy at δ = 0 and at the solution, with
the number of test predictions the solve changed. It answers "does LQF do more than its probe here?" (the low-shot
question of issue 21: at 5 shots leave-one-out picks λ = 100, and δ barely moves):

    python -m lqf_exp.influence.movement <sweep dir> [--out DIR]     # movement.csv and movement.md

Every finished LQF cell below the sweep directory (with its ``checkpoints/final.ckpt``) is one row; the others are
skipped. The accuracies are recomputed from the checkpoint, so the δ*-column equals the cell's own test/acc.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from lqf_exp.influence.run_dir import Scores, load_finished_run, scores
from lqf_exp.report.markdown import md_row, write_csv
from lqf_exp.report.provenance import provenance_lines, shown_path
from lqf_exp.results import METRICS_FILE, read_metrics

log = logging.getLogger(__name__)

__all__ = ["movement", "sweep_movement"]


def movement(run_dir: Path) -> dict[str, Any]:
    """One finished LQF run's δ against its probe: norms, accuracies at δ = 0 and at δ*, predictions changed."""
    run = load_finished_run(run_dir)
    module, data = run.module, run.datamodule
    net = module.linearized
    deltas = net.delta_list()
    weights = dict(net.base_network.named_parameters())
    w0 = torch.cat([weights[name].detach().reshape(-1) for name in net.linearized_names]).double()
    delta = torch.cat([d.detach().reshape(-1) for d in deltas]).double()

    def evaluate() -> dict[str, Scores]:
        return {split: scores(module, getattr(data, f"{split}_dataset"), data.eval_batch_size)
                for split in ("val", "test")}

    solved = evaluate()
    saved = [d.detach().clone() for d in deltas]
    with torch.no_grad():
        for d in deltas:
            d.zero_()
        probe = evaluate()
        for d, value in zip(deltas, saved, strict=True):
            d.copy_(value)
    factors = run.metrics.get("factors") or {}
    selection = (run.metrics.get("solver") or {}).get("weight_decay_selection") or {}
    return {
        "data": factors.get("data"), "shots": factors.get("shots"), "seed": factors.get("seed"),
        "train_size": len(data.train_dataset),  # type: ignore[arg-type]
        "target_scale": factors.get("target_scale"),
        "weight_decay": run.weight_decay, "weight_decay_rule": selection.get("method"),
        "head_l2": module.head_record.get("head_l2"),
        "delta_norm": float(delta.norm()), "delta_relative": float(delta.norm() / w0.norm()),
        "val_acc_probe": probe["val"].acc, "val_acc_lqf": solved["val"].acc,
        "test_acc_probe": probe["test"].acc, "test_acc_lqf": solved["test"].acc,
        "test_changed": int((probe["test"].predictions != solved["test"].predictions).sum()),
        "test_size": solved["test"].samples,
    }


def _cells(sweep_dir: Path) -> list[Path]:
    found = []
    for metrics_file in sorted(sweep_dir.rglob(METRICS_FILE)):
        record = read_metrics(metrics_file.parent)
        if record and record.get("status") == "finished" and (record.get("factors") or {}).get("method") == "lqf" \
                and record.get("final_checkpoint"):
            found.append(metrics_file.parent)
    return found


def _order(item: tuple[tuple, list]) -> tuple:
    data, shots, rule, alpha = item[0]
    return str(data), shots, str(rule), alpha or 0.0


def _table(rows: list[dict[str, Any]]) -> str:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["data"], row["shots"] or 0, row["weight_decay_rule"], row["target_scale"])
        groups.setdefault(key, []).append(row)
    header = ["data", "shots", "λ rule", "α", "n", "λ (median)", "‖δ‖/‖w0‖", "test acc at δ = 0", "test acc at δ*",
              "test predictions changed"]
    lines = [md_row(header), "|" + "|".join("---" for _ in header) + "|"]
    for (data, shots, rule, alpha), group in sorted(groups.items(), key=_order):
        mean = {key: statistics.fmean(r[key] for r in group)
                for key in ("delta_relative", "test_acc_probe", "test_acc_lqf", "test_changed")}
        lines.append(md_row([data, shots or "full", rule, "—" if alpha is None else f"{alpha:g}", len(group),
                             f"{statistics.median(r['weight_decay'] for r in group):g}",
                             f"{mean['delta_relative']:.2e}", f"{100 * mean['test_acc_probe']:.2f}",
                             f"{100 * mean['test_acc_lqf']:.2f}",
                             f"{mean['test_changed']:.1f} of {group[0]['test_size']}"]))
    return "\n".join(lines)


def sweep_movement(sweep_dir: Path, out: Path, commands: list[str] | None = None) -> Path:
    """``movement.csv`` (one row per finished LQF cell) and ``movement.md`` (means per data, shots and λ rule)."""
    cells = _cells(sweep_dir)
    if not cells:
        raise FileNotFoundError(f"no finished LQF run with a final checkpoint under {sweep_dir}")
    rows = []
    for index, cell in enumerate(cells, start=1):
        log.info("movement %d/%d: %s", index, len(cells), cell.relative_to(sweep_dir))
        rows.append({"cell": cell.relative_to(sweep_dir).as_posix(), **movement(cell)})
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "movement.csv", rows)
    command = f"python -m lqf_exp.influence.movement {shown_path(sweep_dir)} --out {shown_path(out)}"
    header = "\n".join(provenance_lines(sweep_dir, command, commands or []))
    text = (f"# How far LQF moved from its probe\n\n{header}\n\nMeans over the seeds of each row; δ = 0 is w0 with "
            "the probe head LQF starts from, δ* the solution. `movement.csv` has one row per run.\n\n"
            + _table(rows) + "\n")
    (out / "movement.md").write_text(text)
    return out / "movement.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lqf_exp.influence.movement", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: <sweep dir>/movement)")
    parser.add_argument("--command", action="append", default=[], metavar="CMD",
                        help="the command that ran the sweep, for the header (repeatable; default: multirun.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        path = sweep_movement(args.sweep_dir, args.out or args.sweep_dir / "movement", args.command)
    except FileNotFoundError as error:
        parser.error(str(error))
    print(path.read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
