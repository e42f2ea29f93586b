"""The table of docs/results/README.md that sets this project's numbers beside the independent reference (small ResNet
pre-trained on Fashion-MNIST 0-4; its settings were picked on test, so read it as an optimistic bound).

    python docs/results/reference_table.py outputs/repro ["the command that ran the sweeps"]  # to stdout

Reads the reproduction's sweeps: full fmnist_target from table1 (best lr by validation accuracy), the low-shot
columns from lowshot (NLFT with BN train, probe, LQF: 5 seeds) and reference (NLFT with BN frozen, lr grid: 3 seeds).
Each entry is test accuracy %, mean ± std over seeds [reference]; bold: more than 1.5 points below the reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lqf_exp.report import Cell, load_cells
from lqf_exp.report.provenance import provenance_lines, shown_path
from lqf_exp.report.stats import Pick

COLUMNS = (("fmnist_target", None, "F5–9 100/cls"), ("fmnist_target", 10, "F5–9 10-shot"),
           ("fmnist_target", 5, "F5–9 5-shot"), ("digits", 50, "digits 50/cls"), ("digits", 5, "digits 5-shot"))
# method row: (label, recipe, bn, reference accuracies by column)
ROWS = (
    ("fine-tuning, BN frozen (`nlft`, `method.bn=eval`)", "nlft", "eval", (92.9, 81.9, 79.7, 97.0, 75.2)),
    ("fine-tuning, BN train (`nlft`)", "nlft", "train", (94.3, 82.7, 76.5, 98.8, 75.4)),
    ("LP-FT (`lpft`, BN train)", "lpft", "train", (None,) * 5),
    ("linear probe, solved (`probe`)", "probe", None, (89.1, 75.5, 69.7, 90.8, 67.9)),
    ("LQF + K-FAC (`lqf`)", "lqf", None, (94.4, 79.8, 69.9, 98.6, 84.9)),
)
GAP = 1.5


def _entry(cells: list[Cell], reference: float | None) -> str:
    pick = Pick(cells)
    best = pick.best
    if not best.n:
        return f"{pick.text()}" + (f" [{reference}]" if reference is not None else "")
    acc, std = 100 - best.mean, best.std
    text = f"{acc:.1f} ± {std:.1f} (n={best.n})"
    if reference is not None:
        text = f"**{text}**" if acc < reference - GAP else text
        text += f" [{reference}]"
    return text


def table(root: Path) -> tuple[str, list[Cell]]:
    """The Markdown table and the cells it read."""
    sweeps = {name: load_cells(root / name) for name in ("table1", "lowshot", "reference") if (root / name).is_dir()}
    used: list[Cell] = []
    lines = ["| method | " + " | ".join(c[2] for c in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for label, recipe, bn, references in ROWS:
        entries = []
        for (data, shots, _), reference in zip(COLUMNS, references, strict=True):
            if shots is None:
                pool = sweeps.get("table1", [])
            elif recipe == "nlft" and bn == "eval":
                pool = sweeps.get("reference", [])
            else:
                pool = sweeps.get("lowshot", [])
            cells = [c for c in pool if c.get("data") == data and c.get("shots") == shots
                     and c.get("recipe") == recipe and (bn is None or c.get("bn") == bn)]
            entries.append(_entry(cells, reference))
            used.extend(cells)
        lines.append(f"| {label} | " + " | ".join(entries) + " |")
    return "\n".join(lines), used


def report(root: Path, command: str) -> str:
    """The table under a header that says which code made it, from which cells, how and where."""
    text, used = table(root)
    header = provenance_lines(root, f"python docs/results/reference_table.py {shown_path(root)}", [command],
                              [c.device for c in used], [c.code for c in used])
    return "\n".join(["# Against the independent reference", "", *header, "", text]) + "\n"


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/repro")
    print(report(root, sys.argv[2] if len(sys.argv) > 2 else "bash docs/results/reproduce.sh"), end="")
