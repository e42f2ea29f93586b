"""Influence of every training sample of finished LQF runs: seconds for K-FAC and exact, and how well the K-FAC
informativeness ranks the samples (Spearman correlation with the exact F-SI; target ≥ 0.9).

    python run.py hydra.run.dir=outputs/infl/digits                       # digits, default recipe
    python run.py data=fashion_mnist_target hydra.run.dir=outputs/infl/fmnist
    python benchmarks/influence.py outputs/infl/digits outputs/infl/fmnist

Each run's results are also written as ``python -m lqf_exp.influence <run> --method both`` writes them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from scipy.stats import spearmanr

from lqf_exp.influence import load_finished_run
from lqf_exp.influence.compute import compute_influence
from lqf_exp.influence.outputs import write_outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="finished LQF run directories")
    parser.add_argument("--top", type=float, default=0.1, help="also report the overlap of the top fraction")
    args = parser.parse_args()
    print(f"threads: {torch.get_num_threads()}")
    print("| run | N | λ | K-FAC s | exact s | Spearman F-SI | top-10% overlap | precond |")
    print("|---|---|---|---|---|---|---|---|")
    for run_dir in args.runs:
        run = load_finished_run(run_dir)
        result = compute_influence(run, "both")
        write_outputs(run, result, Path(run_dir) / "influence")
        kfac, exact = result.val["kfac"].informativeness, result.val["exact"].informativeness
        k = max(1, round(args.top * len(kfac)))
        top = len(set(torch.topk(kfac, k).indices.tolist()) & set(torch.topk(exact, k).indices.tolist())) / k
        rho = spearmanr(kfac.numpy(), exact.numpy()).statistic
        print(f"| {run.cfg.data.name} | {len(kfac)} | {run.weight_decay:g} | {result.seconds['kfac']:.0f} | "
              f"{result.seconds['exact']:.0f} | {rho:.3f} | {top:.2f} | {run.cfg.precond.name} |")


if __name__ == "__main__":
    main()
