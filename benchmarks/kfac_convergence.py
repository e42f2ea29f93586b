"""Convergence of SGD against K-FAC-preconditioned SGD on one LQF problem, measured as the objective gap.

The problem is the LQF objective of the whole small ResNet (``linearize="all"``, ``bn_affine="freeze"``, probe head)::

    L(δ) = mean_n Σ_c (f_lin,c(x_n; δ) − α·onehot_c(y_n))² + (λ/2)·‖δ‖²     over the full training set,

a quadratic in δ. It is solved three ways:

1. SGD with momentum 0.9 on δ (minibatches of 64, reshuffled each epoch with a fixed seed);
2. the same SGD with each minibatch gradient (λδ included) replaced by ``(G⊗A + γI)⁻¹ g`` per Conv2d/Linear layer,
   the K-FAC factors computed once at w0 (type-2 Fisher, ``expand``), γ = damping + λ;
3. full-batch conjugate gradient in float64 (Hessian-vector products ``H v = (2/N)·Jᵀ(J v) + λ v`` through
   :class:`~lqf_exp.linearize.LinearizedNetwork`) for the optimum ``L*``.

For every epoch it prints the gap ``(L(δ_t) − L*)/L*`` of the best learning rate of each method, the epochs to a 1%
gap, the test accuracy of ``f_lin`` and the check "K-FAC needs at most a fifth of the epochs of SGD". Example::

    python benchmarks/kfac_convergence.py --task both
    python benchmarks/kfac_convergence.py --quick
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lqf_exp.data import DigitsDataModule, FashionMNISTDataModule  # noqa: E402
from lqf_exp.head_init import init_head  # noqa: E402
from lqf_exp.linearize import LinearizedNetwork  # noqa: E402
from lqf_exp.losses import ScaledMSELoss  # noqa: E402
from lqf_exp.models import build_network  # noqa: E402
from lqf_exp.precond import FactorAccumulator, KroneckerInverse, precondition_layer  # noqa: E402

ALPHA = 15.0  # MSE target scale of the paper
ACTIVATION = {"name": "leaky_relu", "negative_slope": 0.01}
TARGET_GAP = 0.01
MILESTONES = (100.0, 10.0, 1.0, 0.1, TARGET_GAP)  # gaps at which "epochs to reach" is reported
DIVERGED = 1e3  # a run whose gap exceeds DIVERGED × its initial gap (or is not finite) has diverged
# (plain SGD diverges above lr ≈ 6e-6 here since λmax(H) ≈ 6e5; K-FAC above ≈ 2e-3 since λmax(PH) ≈ 2e3)
# (digits; on the FMNIST target task SGD at 1e-6 and K-FAC at 1e-4 already drift upward, so its grids are 10x lower)
LRS = {"digits": ((1e-6, 3e-6, 6e-6), (1e-4, 3e-4, 1e-3)), "fmnist_target": ((1e-7, 3e-7, 6e-7), (1e-5, 3e-5, 1e-4))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="digits", choices=["digits", "fmnist_target", "both"])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--l2", type=float, default=1e-4, help="λ, the weight decay of δ (also the probe head's)")
    p.add_argument("--damping", type=float, default=1e-3, help="K-FAC damping; γ = damping + λ")
    p.add_argument("--sgd-lrs", type=float, nargs="+", default=None, help="default: per task, see LRS")
    p.add_argument("--kfac-lrs", type=float, nargs="+", default=None, help="default: per task, see LRS")
    p.add_argument("--cg-tol", type=float, default=1e-8, help="CG stops at this relative residual ‖r‖/‖g0‖ ...")
    p.add_argument("--cg-max-iter", type=int, default=60, help="... or after this many iterations ...")
    p.add_argument(
        "--cg-stall",
        type=int,
        default=25,
        help="... or when the best residual has not dropped by 10%% over this many iterations",
    )
    p.add_argument(
        "--cg-precond",
        choices=["kfac", "none"],
        default="kfac",
        help="preconditioner of CG (the K-FAC inverse in float64 speeds it up; any SPD one is exact)",
    )
    p.add_argument(
        "--cg-dtype",
        choices=["float32", "float64"],
        default="float32",
        help="dtype of the network in CG's Hessian-vector products (float64: ~9x slower on CPU)",
    )
    p.add_argument("--chunk", type=int, default=256, help="images per full-batch chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke test: 3 epochs, one lr per method, short CG")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = min(args.epochs, 3)
        args.cg_max_iter = min(args.cg_max_iter, 10)
    return args


# ---- the problem ---------------------------------------------------------------------------------------------
@dataclass
class Problem:
    """One LQF problem: the linearized network (float32), its float64 copy and the data as tensors."""

    name: str
    lin: LinearizedNetwork
    lin64: LinearizedNetwork
    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    l2: float
    chunk: int
    loss_fn: ScaledMSELoss = field(default_factory=lambda: ScaledMSELoss(ALPHA))

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    def targets(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        return ALPHA * F.one_hot(y, self.num_classes).to(dtype)


def _stack(dataset: torch.utils.data.Dataset) -> tuple[Tensor, Tensor]:
    items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items], dtype=torch.int64)


def build_problem(task: str, l2: float, chunk: int) -> Problem:
    """Data, packaged FMNIST-0..4 network, probe head fit by ridge regression at λ, and the linearization."""
    if task == "digits":
        dm = DigitsDataModule()
    else:
        dm = FashionMNISTDataModule(classes=[5, 6, 7, 8, 9], train_per_class=100)
    dm.setup("fit")
    x, y = _stack(dm.train_dataset)
    x_test, y_test = _stack(dm.test_dataset)
    net = build_network("small_resnet", num_classes=dm.num_classes, activation=ACTIVATION, weights="packaged")
    init_head(
        net, DataLoader(TensorDataset(x, y), batch_size=chunk), kind="probe", loss=ScaledMSELoss(ALPHA), l2=l2
    )
    lin = LinearizedNetwork(net, linearize="all", bn_affine="freeze")
    lin64 = copy.deepcopy(lin).double()
    return Problem(task, lin, lin64, x, y, x_test, y_test, dm.num_classes, l2, chunk)


def deltas(lin: LinearizedNetwork) -> list[Tensor]:
    """The δ tensors in a fixed order."""
    return list(lin.delta_named().values())


@torch.no_grad()
def set_deltas(lin: LinearizedNetwork, values: list[Tensor] | None) -> None:
    """Copy ``values`` into the δs (zeros when None)."""
    for d, v in zip(deltas(lin), values or [None] * len(deltas(lin)), strict=True):
        d.zero_() if v is None else d.copy_(v)


def dot(a: list[Tensor], b: list[Tensor]) -> float:
    """Inner product of two lists of tensors, in float64."""
    return float(sum((u.double() * v.double()).sum() for u, v in zip(a, b, strict=True)))


@torch.no_grad()
def objective(prob: Problem, lin: LinearizedNetwork) -> float:
    """Full-batch ``L(δ)`` at the current δs of ``lin`` (sums accumulated in float64)."""
    dtype = deltas(lin)[0].dtype
    total = 0.0
    for xc, yc in zip(prob.x.split(prob.chunk), prob.y.split(prob.chunk), strict=True):
        out = lin(xc.to(dtype))
        total += float((out - prob.targets(yc, dtype)).double().pow(2).sum())
    return total / prob.n + 0.5 * prob.l2 * dot(deltas(lin), deltas(lin))


@torch.no_grad()
def test_accuracy(prob: Problem, lin: LinearizedNetwork) -> float:
    """Accuracy of ``f_lin`` on the test split."""
    dtype = deltas(lin)[0].dtype
    hits = sum(
        int((lin(xc.to(dtype)).argmax(1) == yc).sum())
        for xc, yc in zip(prob.x_test.split(prob.chunk), prob.y_test.split(prob.chunk), strict=True)
    )
    return hits / len(prob.y_test)


def minibatch_loss(prob: Problem, lin: LinearizedNetwork, xb: Tensor, yb: Tensor) -> Tensor:
    """``ScaledMSELoss(f_lin(xb), yb) + (λ/2)·‖δ‖²``: an unbiased minibatch estimate of ``L``."""
    penalty = sum(d.pow(2).sum() for d in deltas(lin))
    return prob.loss_fn(lin(xb), yb) + 0.5 * prob.l2 * penalty


def epoch_batches(n: int, batch: int, seed: int, epoch: int) -> list[Tensor]:
    """The shuffled minibatch indices of one epoch (the same for every method and lr)."""
    g = torch.Generator().manual_seed(1_000_003 * seed + epoch)
    return list(torch.randperm(n, generator=g).split(batch))


# ---- K-FAC -----------------------------------------------------------------------------------------------------
def kfac_factors(prob: Problem) -> dict[str, tuple[Tensor, Tensor]]:
    """K-FAC factors ``{layer: (A, G)}`` at w0 over the whole training set (type-2 Fisher, expand), float64 sums."""
    lin = prob.lin
    layers = lin.curvature_layers()
    covered = sum(w.numel() + (0 if b is None else b.numel()) for w, b in layers.values())
    total = sum(d.numel() for d in deltas(lin))
    if covered != total:
        raise RuntimeError(f"K-FAC layers cover {covered} of {total} δ entries")
    acc = FactorAccumulator(
        lin.base_network,
        {n: b is not None for n, (_, b) in layers.items()},
        ScaledMSELoss(ALPHA),
        fisher_type="type2",
        kfac_approx="expand",
    )
    dtype = deltas(lin)[0].dtype
    for xc, yc in zip(prob.x.split(prob.chunk), prob.y.split(prob.chunk), strict=True):
        acc.accumulate(xc.to(dtype), yc)
    return acc.finalize("mean")


def invert(factors: dict[str, tuple[Tensor, Tensor]], gamma: float, dtype: torch.dtype) -> dict[str, KroneckerInverse]:
    """``(G⊗A + γI)⁻¹`` of every layer, applied in ``dtype``."""
    return {n: KroneckerInverse(A, G, gamma, dtype=dtype) for n, (A, G) in factors.items()}


def precondition(lin: LinearizedNetwork, inverses: dict[str, KroneckerInverse]) -> None:
    """Replace the ``.grad`` of every δ by the K-FAC preconditioned gradient."""
    for name, (weight, bias) in lin.curvature_layers().items():
        precondition_layer(inverses[name], weight, bias)


# ---- SGD -------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One SGD run: the objective after each epoch (index 0: δ = 0)."""

    method: str
    lr: float
    losses: list[float]
    diverged: bool
    test_acc: float
    seconds: float

    def gaps(self, l_star: float) -> list[float]:
        return [(v - l_star) / l_star for v in self.losses]


def run_sgd(
    prob: Problem,
    method: str,
    lr: float,
    epochs: int,
    batch: int,
    seed: int,
    inverses: dict[str, KroneckerInverse] | None,
) -> Run:
    """SGD with momentum 0.9 on δ from zero; K-FAC-preconditioned when ``inverses`` is given."""
    t0 = time.perf_counter()
    lin = prob.lin
    set_deltas(lin, None)
    opt = torch.optim.SGD(deltas(lin), lr=lr, momentum=0.9)
    losses = [objective(prob, lin)]
    diverged = False
    for epoch in range(epochs):
        for idx in epoch_batches(prob.n, batch, seed, epoch):
            opt.zero_grad(set_to_none=True)
            minibatch_loss(prob, lin, prob.x[idx], prob.y[idx]).backward()
            if inverses is not None:
                precondition(lin, inverses)
            opt.step()
        losses.append(objective(prob, lin))
        if not math.isfinite(losses[-1]) or losses[-1] > DIVERGED * losses[0]:
            diverged = True
            break
    diverged = diverged or losses[-1] > losses[0]  # ended above its start: diverging, excluded from "best"
    acc = test_accuracy(prob, lin) if math.isfinite(losses[-1]) else float("nan")
    return Run(method, lr, losses, diverged, acc, time.perf_counter() - t0)


# ---- the exact optimum -----------------------------------------------------------------------------------------
def jtj_plus(prob: Problem, lin: LinearizedNetwork, v: list[Tensor] | None) -> tuple[list[Tensor], Tensor]:
    """Full batch, in the dtype of ``lin``: ``Σ_n J_nᵀ(J_n v)``, or ``Σ_n J_nᵀ(f0_n − α·onehot_n)`` when ``v`` is None.

    ``J v`` is the tangent of the linearized forward with δ = v; ``Jᵀ u`` is autograd of that tangent. Returns the
    products in float64 and the outputs ``f0`` at w0.
    """
    set_deltas(lin, v)
    ds = deltas(lin)
    out = [torch.zeros_like(d, dtype=torch.float64) for d in ds]
    f0s = []
    dtype = ds[0].dtype
    for xc, yc in zip(prob.x.split(prob.chunk), prob.y.split(prob.chunk), strict=True):
        primal, tangent = lin.forward_with_primal(xc.to(dtype))
        u = (primal - prob.targets(yc, dtype)) if v is None else tangent.detach()
        for o, g in zip(out, torch.autograd.grad(tangent, ds, grad_outputs=u), strict=True):
            o.add_(g)
        f0s.append(primal)
    set_deltas(lin, None)
    return out, torch.cat(f0s)


def hvp(prob: Problem, lin: LinearizedNetwork, v: list[Tensor]) -> list[Tensor]:
    """``H v = (2/N)·Jᵀ(J v) + λ v`` (products in the dtype of ``lin``, result in float64)."""
    jtjv, _ = jtj_plus(prob, lin, v)
    return [(2.0 / prob.n) * a + prob.l2 * b.double() for a, b in zip(jtjv, v, strict=True)]


@dataclass
class CGResult:
    """The CG solution and how tight it is."""

    l_star: float
    l0: float
    iters: int
    rel_residual: float
    grad_norm: float
    gap_bound: float
    quadratic_l: float
    test_acc: float
    seconds: float
    history: list[tuple[int, float, float]]


def layer_slots(lin: LinearizedNetwork) -> dict[str, tuple[int, int | None]]:
    """For each K-FAC layer, the positions of its weight and bias δ in :func:`deltas`."""
    order = {id(d): i for i, d in enumerate(deltas(lin))}
    return {n: (order[id(w)], None if b is None else order[id(b)]) for n, (w, b) in lin.curvature_layers().items()}


def kfac_apply(
    inverses: dict[str, KroneckerInverse], slots: dict[str, tuple[int, int | None]], r: list[Tensor]
) -> list[Tensor]:
    """``(G⊗A + γI)⁻¹ r`` layer by layer, on a list of tensors shaped like the δs."""
    z = [torch.empty_like(t) for t in r]
    for name, (iw, ib) in slots.items():
        V = r[iw].reshape(r[iw].shape[0], -1)
        if ib is not None:
            V = torch.cat([V, r[ib].reshape(-1, 1)], dim=1)
        P = inverses[name].apply(V)
        n_w = V.shape[1] - int(ib is not None)
        z[iw] = P[:, :n_w].reshape(r[iw].shape)
        if ib is not None:
            z[ib] = P[:, n_w].reshape(r[ib].shape)
    return z


def solve_cg(prob: Problem, args: argparse.Namespace, factors: dict[str, tuple[Tensor, Tensor]]) -> CGResult:
    """Full-batch (preconditioned) conjugate gradient on ``H δ = −g0``, vectors and reductions in float64.

    ``g0`` and the final checks use the float64 network; the Hessian-vector products of the iterations use the
    network in ``--cg-dtype``. The objective along the iterates follows from the recurrence residual
    ``r = −g0 − Hδ`` without extra passes: ``L(δ) = L(0) + ½·g0ᵀδ − ½·rᵀδ``. Since ``H ⪰ λI``,
    ``L(δ) − L* = ½·rᵀH⁻¹r ≤ ‖r‖²/(2λ)`` bounds how far the returned value is above the exact ``L*``.
    """
    t0 = time.perf_counter()
    lin_it = prob.lin64 if args.cg_dtype == "float64" else prob.lin
    jtr, f0 = jtj_plus(prob, prob.lin64, None)
    g0 = [(2.0 / prob.n) * a for a in jtr]
    l0 = float((f0 - prob.targets(prob.y, torch.float64)).pow(2).sum()) / prob.n
    b = [-g for g in g0]
    b_norm = math.sqrt(dot(b, b))
    gamma = args.damping + prob.l2
    inverses = invert(factors, gamma, torch.float64) if args.cg_precond == "kfac" else None
    slots = layer_slots(prob.lin64)

    def apply_precond(r: list[Tensor]) -> list[Tensor]:
        return [t.clone() for t in r] if inverses is None else kfac_apply(inverses, slots, r)

    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    z = apply_precond(r)
    p = [t.clone() for t in z]
    rz = dot(r, z)
    best, best_at, history = 1.0, 0, []
    it = 0
    while it < args.cg_max_iter:
        hp = hvp(prob, lin_it, p)
        step = rz / dot(p, hp)
        for xi, pi, ri, hi in zip(x, p, r, hp, strict=True):
            xi.add_(pi, alpha=step)
            ri.add_(hi, alpha=-step)
        it += 1
        rel = math.sqrt(dot(r, r)) / b_norm
        history.append((it, rel, l0 + 0.5 * dot(g0, x) - 0.5 * dot(r, x)))
        if rel < 0.9 * best:
            best, best_at = rel, it
        if rel <= args.cg_tol or it - best_at >= args.cg_stall:
            break
        z = apply_precond(r)
        rz_new = dot(r, z)
        p = [zi + (rz_new / rz) * pi for zi, pi in zip(z, p, strict=True)]
        rz = rz_new
    # Checks with fresh float64 passes: the true gradient at the solution and the objective evaluated directly.
    hx = hvp(prob, prob.lin64, x)
    grad = [h + g for h, g in zip(hx, g0, strict=True)]
    grad_norm = math.sqrt(dot(grad, grad))
    set_deltas(prob.lin64, x)
    direct = objective(prob, prob.lin64)
    set_deltas(prob.lin64, None)
    set_deltas(prob.lin, x)
    acc = test_accuracy(prob, prob.lin)  # float32: the test split can be large
    set_deltas(prob.lin, None)
    quadratic = l0 + 0.5 * dot(g0, x) + 0.5 * dot(grad, x)  # L(0) + g0ᵀx + ½xᵀHx with Hx = ∇L(x) − g0
    return CGResult(
        direct,
        l0,
        it,
        grad_norm / b_norm,
        grad_norm,
        grad_norm**2 / (2 * prob.l2),
        quadratic,
        acc,
        time.perf_counter() - t0,
        history,
    )


# ---- report ----------------------------------------------------------------------------------------------------
def epochs_to(gaps: list[float], target: float = TARGET_GAP) -> int | None:
    """First epoch whose gap is at most ``target`` (None if never)."""
    return next((e for e, g in enumerate(gaps) if g <= target), None)


def best_run(runs: list[Run], l_star: float) -> Run | None:
    """Lowest final gap among the runs that did not diverge."""
    ok = [r for r in runs if not r.diverged]
    return min(ok, key=lambda r: r.gaps(l_star)[-1]) if ok else None


def verdict(kfac: int | None, sgd: int | None, epochs: int) -> str:
    """The 5× target: K-FAC reaches 1% in at most a fifth of the epochs SGD needs."""
    k = f"> {epochs} (not reached)" if kfac is None else str(kfac)
    s = f"> {epochs} (not reached)" if sgd is None else str(sgd)
    counts = f"K-FAC {k} epochs, SGD {s} epochs"
    if kfac is None:
        return f"FAIL ({counts})"
    if sgd is not None:
        return f"{'PASS' if 5 * kfac <= sgd else 'FAIL'} ({counts}; ratio {sgd / max(kfac, 1):.1f}x)"
    if 5 * kfac <= epochs:
        return f"PASS ({counts}; ratio > {epochs / max(kfac, 1):.1f}x)"
    return f"UNDETERMINED ({counts}; more epochs needed to tell)"


def fmt_gap(runs: dict[str, Run], l_star: float, epoch: int) -> list[str]:
    cells = []
    for run in runs.values():
        gaps = run.gaps(l_star)
        cells.append(f"{gaps[epoch]:.4e}" if epoch < len(gaps) else "-")
    return cells


def bench_task(task: str, args: argparse.Namespace) -> str:
    """Run one task and return its verdict line."""
    t_task = time.perf_counter()
    print(f"\n=== task {task} ===", flush=True)
    prob = build_problem(task, args.l2, args.chunk)
    n_params = sum(d.numel() for d in deltas(prob.lin))
    print(
        f"train {prob.n} images, test {len(prob.y_test)}, {prob.num_classes} classes, δ: {n_params} parameters, "
        f"λ = {args.l2:g}, damping = {args.damping:g} (γ = {args.damping + args.l2:g}), batch {args.batch}"
    )

    # Check: the full-batch L at δ = 0 equals the (sample-weighted) mean of the minibatch losses of one epoch.
    l_full = objective(prob, prob.lin)
    with torch.no_grad():
        parts = [
            (len(i), float(minibatch_loss(prob, prob.lin, prob.x[i], prob.y[i])))
            for i in epoch_batches(prob.n, args.batch, args.seed, 0)
        ]
    l_mb = sum(k * v for k, v in parts) / prob.n
    l_mb_plain = sum(v for _, v in parts) / len(parts)
    ok = abs(l_full - l_mb) <= 1e-5 * abs(l_full)
    print(
        f"check L(0): full batch {l_full:.6f}, minibatch mean (weighted by size) {l_mb:.6f} "
        f"[{'OK' if ok else 'MISMATCH'}], unweighted mean {l_mb_plain:.6f} (last batch has {parts[-1][0]})"
    )

    t = time.perf_counter()
    factors = kfac_factors(prob)
    print(f"K-FAC factors at w0 (float32 network, float64 sums): {time.perf_counter() - t:.1f}s", flush=True)
    cg = solve_cg(prob, args, factors)
    print(
        f"CG ({args.cg_precond} preconditioner, {args.cg_dtype} Hessian-vector products, float64 vectors and "
        f"checks): {cg.iters} iterations in {cg.seconds:.1f}s; "
        f"relative residual ‖∇L(δ*)‖/‖∇L(0)‖ = {cg.rel_residual:.2e} (‖∇L(δ*)‖ = {cg.grad_norm:.3e}, "
        f"‖∇L(0)‖ = {cg.grad_norm / cg.rel_residual:.3e})"
    )
    for it, rel, val in cg.history[:: max(1, len(cg.history) // 8)] + cg.history[-1:]:
        print(f"  CG it {it:4d}: rel residual {rel:.3e}, L {val:.8f}")
    print(
        f"L(0) = {cg.l0:.6f} (float64) / {l_full:.6f} (float32); L* = L(δ_CG) = {cg.l_star:.8f} (direct "
        f"evaluation; from the quadratic form {cg.quadratic_l:.8f}, rel diff "
        f"{abs(cg.quadratic_l - cg.l_star) / cg.l_star:.1e})"
    )
    print(
        f"tightness: 0 <= L(δ_CG) − L* <= ‖∇L‖²/(2λ) = {cg.gap_bound:.3e}, i.e. {cg.gap_bound / cg.l_star:.1e} "
        f"relative (bound from H ⪰ λI); CG test accuracy {cg.test_acc:.4f}"
    )
    l_star = cg.l_star
    del t

    inverses = invert(factors, args.damping + args.l2, torch.float32)
    runs: list[Run] = []
    sgd_lrs, kfac_lrs = LRS[task]
    if args.quick:
        sgd_lrs, kfac_lrs = sgd_lrs[1:2], kfac_lrs[1:2]
    for method, lrs, inv in (("sgd", args.sgd_lrs or sgd_lrs, None), ("kfac", args.kfac_lrs or kfac_lrs, inverses)):
        for lr in lrs:
            run = run_sgd(prob, method, lr, args.epochs, args.batch, args.seed, inv)
            gaps = run.gaps(l_star)
            state = f"final gap {gaps[-1]:.4e}"
            if run.diverged:
                state = f"DIVERGED (epoch {len(gaps) - 1}, gap {gaps[-1]:.3e})"
            print(
                f"  {method:4s} lr {lr:.1e}: {state}, 1% at epoch {epochs_to(gaps)}, "
                f"test acc {run.test_acc:.4f}, {run.seconds:.1f}s",
                flush=True,
            )
            runs.append(run)

    best = {m: best_run([r for r in runs if r.method == m], l_star) for m in ("sgd", "kfac")}
    chosen = {f"{m} lr={r.lr:.0e}": r for m, r in best.items() if r is not None}
    print(
        f"\nGap (L(δ_t) − L*)/L* per epoch, best lr of each method, L* = L(δ_CG) = {l_star:.6f} (L(δ_CG) >= the "
        "exact L*, so these gaps are lower bounds on the exact ones):"
    )
    print("| epoch | " + " | ".join(chosen) + " |")
    print("|---:|" + "---:|" * len(chosen))
    for e in range(args.epochs + 1):
        print(f"| {e} | " + " | ".join(fmt_gap(chosen, l_star, e)) + " |")
    reach = {}
    for m, r in best.items():
        if r is None:
            print(f"{m}: every lr diverged")
            reach[m] = None
            continue
        reach[m] = epochs_to(r.gaps(l_star))
        hit = f"{reach[m]} epochs" if reach[m] is not None else f"not reached in {args.epochs}"
        print(
            f"{m}: best lr {r.lr:g}, 1% gap after {hit}, final gap {r.gaps(l_star)[-1]:.4e}, test acc {r.test_acc:.4f}"
        )
    print("epochs to reach a gap of " + ", ".join(f"{g:g}" for g in MILESTONES) + ":")
    for m, r in best.items():
        if r is not None:
            cells = [epochs_to(r.gaps(l_star), g) for g in MILESTONES]
            print(f"  {m}: " + ", ".join("-" if c is None else str(c) for c in cells))
    line = f"{task}: {verdict(reach['kfac'], reach['sgd'], args.epochs)}"
    print(f"target (K-FAC epochs to 1% <= SGD epochs / 5): {line}")
    print(f"task wall time {time.perf_counter() - t_task:.1f}s")
    return line


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, python "
        f"{platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"args: {vars(args)}", flush=True)
    t0 = time.perf_counter()
    tasks = ["digits", "fmnist_target"] if args.task == "both" else [args.task]
    lines = [bench_task(task, args) for task in tasks]
    print("\nverdicts:")
    for line in lines:
        print(f"  {line}")
    print(f"total wall time {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
