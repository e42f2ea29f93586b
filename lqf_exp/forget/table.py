"""``python -m lqf_exp.forget.table <forget run dir> ...``: one Markdown row per run written by ``lqf_exp.forget``:
what was removed, by which method, with or without the head refit, and the accuracies before and after (on the
removed class's test images where a class was removed), the test predictions changed, the certificate, the time."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lqf_exp.report.provenance import result_header, shown_path
from lqf_exp.results import METRICS_FILE

__all__ = ["forget_table"]

HEADER = ["removed", "method", "head", "test acc before → after", "class right before → after",
          "test predictions changed", "‖∇L′‖ / ‖∇L′(δ*)‖", "seconds"]


def _row(record: dict[str, Any]) -> list[str]:
    before, after, k = record["before"], record["after"], record.get("drop_class")
    removed = f"class {k} ({record['removed']} samples)" if k is not None else f"{record['removed']} samples"
    klass = (f"{before.get(f'test/right_class{k}')} → {after.get(f'test/right_class{k}')}" if k is not None else "—")
    changed = after.get("test/changed_predictions")
    return [removed, record["method"], "refitted" if record["refit_head"] else "kept",
            f"{before['test/acc']:.4f} → {after['test/acc']:.4f}", klass, "—" if changed is None else str(changed),
            f"{record['certificate']['relative_to_run_delta']:.1e}", f"{record['seconds']:.1f}"]


def forget_table(run_dirs: list[Path]) -> str:
    """The Markdown table of the forget runs in ``run_dirs`` (each must hold a metrics.json with a forget entry)."""
    rows = []
    for run_dir in run_dirs:
        path = run_dir / METRICS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not a run written by python -m lqf_exp.forget")
        record = json.loads(path.read_text()).get("forget")
        if record is None:
            raise ValueError(f"{path} has no 'forget' entry: not a run written by python -m lqf_exp.forget")
        rows.append(_row(record))
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lqf_exp.forget.table", description=__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="directories written by python -m lqf_exp.forget")
    args = parser.parse_args(argv)
    try:
        table = forget_table(args.run_dirs)
        command = "python -m lqf_exp.forget.table " + " ".join(shown_path(d) for d in args.run_dirs)
        print("\n".join(["# Forgetting (`python -m lqf_exp.forget`)", "", *result_header([command]), "", table]),
              end="")
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
