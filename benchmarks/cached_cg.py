"""Preconditioned CG on the Jacobian cache, with and without the sketched two-level preconditioner.

On the default task (digits, every layer linearized, the default head and K-FAC factors) at a fixed λ, from δ = 0:
the objective after k CG iterations with K-FAC alone and with K-FAC made two-level by a sketch of the dominant
subspace of P·H (:func:`lqf_exp.solvers.deflation.sketch_dominant_subspace`, :class:`~lqf_exp.solvers.deflation.
Deflation`). Everything is the package's own code; the cache, the sketch and each CG iteration are timed. Example::

    python benchmarks/cached_cg.py --weight-decay 1 --rank 256 --iterations 2       # the benchmarks/README table
    python benchmarks/cached_cg.py --weight-decay 1e-3 --rank 128 --iterations 1 --cg 60
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lqf_exp.config import compose_config
from lqf_exp.jacobian_cache import JacobianCache
from lqf_exp.pipeline import build, build_module
from lqf_exp.precond import KFACOperator
from lqf_exp.precond.operator import operator_options
from lqf_exp.solvers import ConjugateGradient, LQFObjective
from lqf_exp.solvers.cg import MatVec
from lqf_exp.solvers.deflation import KrylovSpace, sketch_dominant_subspace
from lqf_exp.solvers.objective import flatten

REPORT_AT = (10, 20, 30, 50, 75, 100, 150, 200)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weight-decay", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=128, help="sketch rank (0: K-FAC alone only)")
    p.add_argument("--iterations", type=int, default=1, help="subspace iterations of the sketch")
    p.add_argument("--cg", type=int, default=150, help="CG iterations per run")
    p.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides of the task (default: digits)")
    return p.parse_args(argv)


def setup(args: argparse.Namespace) -> LQFObjective:
    """The default run's objective at λ with its K-FAC preconditioner and the Jacobian cache attached."""
    cfg = compose_config(["logger=none", f"method.weight_decay={args.weight_decay}", *args.overrides],
                         Path("outputs/benchmarks/cached_cg"))
    pl.seed_everything(cfg.seed)
    datamodule = build(cfg.data)
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    loader = DataLoader(datamodule.train_dataset, batch_size=datamodule.eval_batch_size)
    module.initialize_head(loader)
    objective = LQFObjective(module.linearized, module.loss_fn, args.weight_decay)
    keys = ("fisher_type", "mc_samples", "kfac_approx", "damping", "eigenvalue_correction")
    options = operator_options(**{k: cfg.precond.callback[k] for k in keys})
    operator = KFACOperator(module.curvature_targets(), **options)
    operator.estimate([b for _, b in zip(range(cfg.precond.callback.num_batches), datamodule.train_dataloader(),
                                         strict=False)])
    operator.set_damping_offset(args.weight_decay)
    objective.attach(operator)
    started = time.perf_counter()
    objective.attach_cache(JacobianCache.build(module.linearized, loader, len(datamodule.train_dataset)))
    print(f"Jacobian cache: {time.perf_counter() - started:.1f} s", flush=True)
    return objective


def run_cg(objective: LQFObjective, precondition: MatVec, label: str, iterations: int) -> None:
    start = objective.evaluate((), gradient=True)
    assert start.gradient is not None
    cg = ConjugateGradient([-g for g in start.gradient], precondition)
    values, started = {}, time.perf_counter()
    for k in range(1, iterations + 1):
        cg.advance(objective.hvp((), cg.direction()))
        if k in REPORT_AT or k == iterations:
            x, g0 = flatten(cg.x), flatten(start.gradient).double()
            values[k] = start.objective + 0.5 * float(g0 @ x) - 0.5 * float(flatten(cg.r) @ x)
    seconds = (time.perf_counter() - started) / iterations
    print(f"| {label} | {seconds:.2f} | " + " | ".join(f"{k}: {v:.4f}" for k, v in values.items()) + " |", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"machine: {platform.platform()}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"args {vars(args)}", flush=True)
    objective = setup(args)
    print(f"L(0) = {objective.evaluate(()).objective:.4f}\n| preconditioner | s / iteration | objective after k |")
    run_cg(objective, objective.precondition, "K-FAC", args.cg)
    if args.rank:
        started = time.perf_counter()
        size = sum(d.numel() for d in objective.deltas)
        space = KrylovSpace(max_gb=64.0)
        space.add_block(*sketch_dominant_subspace(objective.data_hvp_block, objective.precondition_block, size,
                                                  args.rank, args.iterations), torch.finfo(torch.float32).eps)
        deflation = space.deflation(args.weight_decay)
        assert deflation is not None
        print(f"sketch: rank {args.rank}, {args.iterations} iteration(s), {time.perf_counter() - started:.1f} s, "
              f"{deflation.size} directions kept", flush=True)

        run_cg(objective, deflation.preconditioner(objective.precondition),
               f"K-FAC + sketch (rank {args.rank}, {args.iterations} it.)", args.cg)


if __name__ == "__main__":
    main()
