"""``python -m lqf_exp.forget <run dir> --drop <index file> [--out DIR] [--method auto|exact|solve|retrain]
[--refit-head]`` (or ``--drop-class k``): the finished LQF run without those training samples, written as a new run
directory (the original is never touched); its ``metrics.json`` has a ``forget`` entry and ``certificate.json`` the
gradient norm of the new objective at the edited δ."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lqf_exp.forget.command import METHODS, ForgetOptions, forget


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lqf_exp.forget", description=__doc__)
    parser.add_argument("run_dir", help="the output directory of a finished LQF run (method=lqf, loss=mse)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--drop", type=Path, help="training-set indices to remove, one per line (as data.drop)")
    which.add_argument("--drop-class", type=int, help="remove every training sample of this class")
    parser.add_argument("--out", type=Path, default=None,
                        help="new run directory (default: beside the run, <run>-forget-<file or class>-<method>)")
    parser.add_argument("--method", default="auto", choices=METHODS,
                        help="exact: the dual system's closed form; solve: CG warm-started at the run's δ*; retrain: "
                             "CG from δ = 0 to ‖∇L‖/‖∇L(0)‖ ≤ --retrain-tol (the reference); auto (default): exact "
                             "where the dual system fits --max-rows/--max-memory-gb, else solve")
    parser.add_argument("--refit-head", action="store_true",
                        help="refit the probe head without the removed samples first (then w0 holds none of them)")
    parser.add_argument("--tol", type=float, default=1e-2,
                        help="solve: stop once ‖δ − δ_ref‖ ≤ tol·‖δ* − δ_ref‖ is certified by ‖∇L‖/λ (default 1e-2)")
    parser.add_argument("--retrain-tol", type=float, default=None,
                        help="retrain: stop at ‖∇L‖ ≤ tol·‖∇L(0)‖ (default 1e-6 for a float32 run, 1e-10 for float64)")
    parser.add_argument("--max-iter", type=int, default=2000, help="CG iterations at most (default 2000)")
    parser.add_argument("--sketch-rank", type=int, default=512,
                        help="deflate CG by this many sketched stiff directions when J is cached; 0: off (default 512)")
    parser.add_argument("--max-rows", type=int, default=6000, help="exact: largest N·C (default 6000)")
    parser.add_argument("--max-memory-gb", type=float, default=4.0, help="exact: memory bound in GB (default 4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        options = ForgetOptions(args.method, args.refit_head, args.tol, args.retrain_tol, args.max_iter,
                                args.sketch_rank, args.max_rows, args.max_memory_gb)
        out, payload = forget(Path(args.run_dir), args.drop, args.drop_class, args.out, options)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        parser.error(str(error))
    record = payload["forget"]
    before, after = record["before"], record["after"]
    status = "" if record["converged"] else "NOT CONVERGED (raise --max-iter): "
    print(f"{status}{out}: removed {record['removed']} of {record['removed'] + record['train_size']} training samples "
          f"by {record['method']}{' with the head refitted' if record['refit_head'] else ''} in {record['seconds']} s; "
          f"test acc {before['test/acc']:.4f} -> {after['test/acc']:.4f}; ‖∇L‖ at the edited δ = "
          f"{record['certificate']['relative_to_run_delta']:.1e} × at the run's δ*")
    for key in before:
        if key.startswith("test/acc_class"):
            right = key.replace("acc", "right")
            print(f"{key}: {before[key]} ({before[right]}) -> {after[key]} ({after[right]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
