"""``python -m lqf_exp.influence <run dir>``: the leave-one-out influence of every training sample of a finished LQF
run on its validation and test predictions; writes ``<run dir>/influence/`` (``influence.csv``: index, label, class,
F-SI, leverage, self-influence; ``gallery.png``; ``test_change_<method>.pt``; ``influence.json``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lqf_exp.influence.compute import METHODS, compute_influence
from lqf_exp.influence.outputs import CSV_FILE, write_outputs
from lqf_exp.influence.run_dir import load_finished_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lqf_exp.influence", description=__doc__)
    parser.add_argument("run_dir", help="the output directory of a finished LQF run (method=lqf, loss=mse)")
    parser.add_argument("--method", default="kfac", choices=METHODS,
                        help="kfac: the run's K-FAC inverse (fast); exact: the dual system; both: and their "
                             "rank correlation (default: kfac)")
    parser.add_argument("--out", default=None, help="output directory (default: <run dir>/influence)")
    parser.add_argument("--chunk", type=int, default=64, help="training samples per Jacobian chunk (default: 64)")
    parser.add_argument("--gallery", type=int, default=8, help="images per gallery row (default: 8)")
    parser.add_argument("--max-rows", type=int, default=16000, help="exact: largest N·C allowed (default: 16000)")
    parser.add_argument("--max-memory-gb", type=float, default=16.0, help="exact: memory bound (default: 16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        run = load_finished_run(args.run_dir)
        result = compute_influence(run, args.method, args.chunk, args.max_rows, args.max_memory_gb)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    out = Path(args.out) if args.out else run.run_dir / "influence"
    summary = write_outputs(run, result, out, args.gallery)
    print(f"{out / CSV_FILE}: {summary['train_size']} training samples; seconds {summary['seconds']}"
          + (f"; Spearman(F-SI K-FAC, exact) = {summary['spearman_fsi_kfac_vs_exact']:.3f}"
             if "spearman_fsi_kfac_vs_exact" in summary else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
