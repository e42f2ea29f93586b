"""Every LQF solver with its default config on the offline tasks: passes and time to a 1% and a 0.01% gap.

For each task the optimum ``L*`` of the objective at λ is certified first — by ``solver=kernel`` (exact, through the
dual system) where ``N·C`` is small enough, else by ``solver=cg`` run to a relative residual of 1e-8 — and λ is the
leave-one-out choice of ``weight_decay=auto`` on the kernel tasks and ``--large-lambda`` on digits (what the
default run's validation path chose there). Then every solver runs through :func:`lqf_exp.pipeline.run` exactly as
the CLI runs it, with that λ fixed and only a cap on the passes (no early stop), and the per-pass objective
recorded in its ``metrics.json`` (``solver.history``) gives the gap ``(L − L*)/(L(0) − L*)`` after each pass.

A pass is one epoch over the training data: for ``adaptive`` a gradient and two forward-mode products per step
(then one curvature product per pass once it has handed over to conjugate gradient), for ``sgd`` a gradient per
step, for ``cg`` one curvature product, for ``kernel`` the Jacobian rows. Times include the evaluation passes a
solver needs for its stopping rule.

Then, on the default task (digits) at the same λ, ``λmax(P·H)`` of the preconditioned Hessian for ``precond=none``,
``kfac`` and ``ekfac`` by power iteration with exact curvature products (:func:`lqf_exp.solvers.spectrum`): 1 would
be an exact preconditioner; a fixed-step method must keep its learning rate below ``2/λmax``. Example::

    python benchmarks/solver_convergence.py                       # the four tasks, every solver
    python benchmarks/solver_convergence.py --tasks digits-5shot --solvers adaptive cg --max-passes 20
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lqf_exp.config import compose_config
from lqf_exp.pipeline import build, build_module, run
from lqf_exp.precond import KFACOperator
from lqf_exp.precond.operator import operator_options
from lqf_exp.solvers import DivergenceError, LQFObjective, preconditioned_max_eigenvalue

TASKS = {
    "digits": ["data=digits"],
    "digits-5shot": ["data=digits", "data.shots=5"],
    "fmnist": ["data=fashion_mnist_target"],
    "fmnist-5shot": ["data=fashion_mnist_target", "data.shots=5"],
}
KERNEL_ROWS = {"digits": 12950, "digits-5shot": 500, "fmnist": 2250, "fmnist-5shot": 125}
QUIET = ["logger=none", "callbacks.progress_bar.refresh_rate=0", "skip_finished=false", "resume=false"]
GAPS = (1e-2, 1e-4)


@dataclass
class Result:
    task: str
    solver: str
    weight_decay: float
    passes_to: dict[float, int | None]
    seconds_to: dict[float, float | None]
    final_gap: float
    test_acc: float
    seconds: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--solvers", nargs="+", default=["adaptive", "sgd", "cg", "kernel"],
                   choices=["adaptive", "sgd", "cg", "kernel"])
    p.add_argument("--max-passes", type=int, default=60)
    p.add_argument("--certify-passes", type=int, default=400, help="cap of the CG certificate where no kernel fits")
    p.add_argument("--large-lambda", type=float, default=1e-3, help="λ where the kernel does not fit (digits)")
    p.add_argument("--plain-sgd-lrs", type=float, nargs="*", default=[],
                   help="also run sgd with precond=none at these learning rates (best of them reported)")
    p.add_argument("--spectrum-task", default="digits", choices=[*TASKS, "none"],
                   help="task whose λmax(P·H) is measured for each preconditioner ('none': skip)")
    p.add_argument("--out", default="outputs/benchmarks/solver_convergence")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args(argv)


def solve(task: str, overrides: list[str], out: Path) -> dict:
    """One run through the pipeline; returns its metrics.json payload."""
    started = time.perf_counter()
    try:
        payload = run(compose_config([*TASKS[task], *QUIET, *overrides], out))
    except DivergenceError:  # a result: metrics.json holds the history up to the blow-up
        payload = json.loads((out / "metrics.json").read_text())
    payload["wall_s"] = time.perf_counter() - started
    return payload


def certify(task: str, args: argparse.Namespace, out: Path) -> tuple[float, float, float]:
    """``(λ, L*, test accuracy at the optimum)``: exact through the kernel where it fits, else CG to 1e-8."""
    if KERNEL_ROWS[task] <= 6000:
        payload = solve(task, ["solver=kernel"], out / task / "certify")
    else:
        payload = solve(task, ["solver=cg", "solver.tol=1e-8", f"method.weight_decay={args.large_lambda}",
                               "method.stop.rel_gap=1e-12", f"method.stop.max_epochs={args.certify_passes}",
                               f"trainer.max_epochs={args.certify_passes}"],
                        out / task / "certify")
    summary = payload["solver"]
    print(f"{task}: λ = {summary['weight_decay']:g}, L* = {summary['objective']:.8g} certified by {summary['solver']} "
          f"(‖∇L‖/‖∇L(0)‖ = {summary['grad_norm'] / summary['grad_norm_start']:.1e}, {summary['epochs']} passes), "
          f"test acc {payload['metrics']['test/acc']:.4f}", flush=True)
    return summary["weight_decay"], summary["objective"], payload["metrics"]["test/acc"]


def measure(task: str, label: str, overrides: list[str], weight_decay: float, l_star: float,
            args: argparse.Namespace, out: Path) -> Result:
    passes = args.max_passes
    payload = solve(task, [*overrides, f"method.weight_decay={weight_decay}", "method.stop.rel_gap=1e-12",
                           f"method.stop.max_epochs={passes}", f"trainer.max_epochs={passes}"], out / task / label)
    history = payload["solver"].get("history") or [{"objective": float("nan"), "epoch": 0, "seconds": 0.0}]
    start = history[0]["objective"]
    gaps = [((row["objective"] - l_star) / (start - l_star), row) for row in history]
    passes_to = {g: next((int(row["epoch"]) for gap, row in gaps if gap <= g), None) for g in GAPS}
    seconds_to = {g: next((row["seconds"] for gap, row in gaps if gap <= g), None) for g in GAPS}
    final_gap = gaps[-1][0] if payload["status"] == "finished" and gaps else float("inf")  # inf: diverged
    return Result(task, label, weight_decay, passes_to, seconds_to, final_gap,
                  payload["metrics"].get("test/acc", float("nan")), payload["wall_s"])


def max_eigenvalue(task: str, precond: str, weight_decay: float, out: Path) -> tuple[float, int]:
    """``λmax(P·H)`` at w0 with the default head and factors of ``precond``, over the full training set."""
    cfg = compose_config([*TASKS[task], *QUIET, f"precond={precond}", f"method.weight_decay={weight_decay}"], out)
    pl.seed_everything(cfg.seed)
    datamodule = build(cfg.data)
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    loader = lambda: DataLoader(datamodule.train_dataset, batch_size=datamodule.eval_batch_size)  # noqa: E731
    module.initialize_head(loader())
    objective = LQFObjective(module.linearized, module.loss_fn, weight_decay)
    if cfg.precond.get("callback"):
        options = {k: cfg.precond.callback[k] for k in ("fisher_type", "mc_samples", "kfac_approx", "damping",
                                                          "eigenvalue_correction")}
        operator = KFACOperator(module.curvature_targets(), **operator_options(**options))
        batches = datamodule.train_dataloader()
        operator.estimate([b for _, b in zip(range(cfg.precond.callback.num_batches), batches, strict=False)])
        objective.attach(operator)
    return preconditioned_max_eigenvalue(objective, loader, iterations=50, rel_tol=1e-3)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; args {vars(args)}", flush=True)
    results: list[Result] = []
    optimum_acc: dict[str, float] = {}
    for task in args.tasks:
        weight_decay, l_star, optimum_acc[task] = certify(task, args, out)
        for solver in args.solvers:
            if solver == "kernel" and KERNEL_ROWS[task] > 6000:
                continue
            results.append(measure(task, solver, [f"solver={solver}"], weight_decay, l_star, args, out))
            print_result(results[-1], optimum_acc[task])
        plain = [measure(task, f"sgd-plain-lr{lr:g}", ["solver=sgd", "precond=none", f"solver.lr={lr}"],
                         weight_decay, l_star, args, out) for lr in args.plain_sgd_lrs]
        if plain:
            results.append(min(plain, key=lambda r: r.final_gap))
            print_result(results[-1], optimum_acc[task])
    print("\n| task | solver | λ | passes to 1% | passes to 0.01% | s to 1% | s to 0.01% | final gap | test acc "
          "(optimum) | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(row(r, optimum_acc[r.task]))
    spectrum = {}
    if args.spectrum_task != "none":
        task = args.spectrum_task
        weight_decay = next((r.weight_decay for r in results if r.task == task), args.large_lambda)
        print(f"\nλmax(P·H) on {task}, λ = {weight_decay:g}, power iteration with exact curvature products:")
        print("| precond | λmax(P·H) | iterations |\n|---|---:|---:|")
        for precond in ("none", "kfac", "ekfac"):
            spectrum[precond], used = max_eigenvalue(task, precond, weight_decay, out / task / "spectrum")
            print(f"| {precond} | {spectrum[precond]:.4g} | {used} |", flush=True)
    rows = [r.__dict__ | {"passes_to": {str(k): v for k, v in r.passes_to.items()},
                          "seconds_to": {str(k): v for k, v in r.seconds_to.items()}} for r in results]
    (out / "results.json").write_text(json.dumps({"results": rows, "lambda_max": spectrum}, indent=2))


def fmt(value: float | None, digits: int = 0) -> str:
    return "not reached" if value is None else f"{value:.{digits}f}"


def row(r: Result, optimum: float) -> str:
    return (f"| {r.task} | {r.solver} | {r.weight_decay:g} | {fmt(r.passes_to[1e-2])} | {fmt(r.passes_to[1e-4])} | "
            f"{fmt(r.seconds_to[1e-2], 1)} | {fmt(r.seconds_to[1e-4], 1)} | {gap_text(r.final_gap)} | {r.test_acc:.4f} "
            f"({optimum:.4f}) | {r.seconds:.0f} |")


def gap_text(gap: float) -> str:
    return "diverged" if gap == float("inf") else f"{gap:.1e}"


def print_result(r: Result, optimum: float) -> None:
    print(row(r, optimum), flush=True)


if __name__ == "__main__":
    main()
