"""Per-step cost of K-FAC preconditioning against the LQF step it preconditions.

    python benchmarks/kfac_overhead.py --model resnet18 --image-size 32 --batch 32 --threads 1
    python benchmarks/kfac_overhead.py --model small_resnet --image-size 32 --batch 64 --threads 1

In one process: the median time of one LQF training step (JVP forward, MSE, backward, SGD on δ) and of
preconditioning every Conv2d/Linear δ gradient with the damped K-FAC inverse, in two forms of the same
``KroneckerInverse``: the full form (``low_rank=False``: four products with the whole eigenbases per layer, the
formula used before the low-rank form) and the default, which rotates only the eigen-directions whose eigenvalue
exceeds 1e-12·γ when that is cheaper (exact, :mod:`lqf_exp.precond.eigenbasis`). Prints their ratios to the step,
the multiply-adds each does, the kept eigen-directions, and the time to re-plan after a damping change. Factors are
estimated at w0 (type-2 Fisher) from ``--factor-batches`` random batches: their rank, not their values, sets the
cost of the low-rank form (one batch makes the input factors of late layers much more rank-deficient than a real
estimate).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torchvision
from torch import nn

from lqf_exp.linearize import LinearizedNetwork
from lqf_exp.losses import ScaledMSELoss
from lqf_exp.models import SmallResNet
from lqf_exp.precond import FactorAccumulator, KroneckerInverse
from lqf_exp.precond.inverse import join_layer, split_layer


def build(name: str, classes: int) -> nn.Module:
    if name == "small_resnet":
        return SmallResNet(num_classes=classes)
    return getattr(torchvision.models, name)(num_classes=classes)


def median_ms(fn, steps: int, warmup: int) -> float:  # noqa: ANN001 - any zero-argument callable
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", choices=["small_resnet", "resnet18", "resnet50"])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--factor-batches", type=int, default=8, help="batches the factors are estimated from")
    p.add_argument("--damping", type=float, default=1e-3)
    args = p.parse_args()
    if args.factor_batches < 1:
        p.error("--factor-batches must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = LinearizedNetwork(build(args.model, args.classes).eval())
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, args.classes, (args.batch,))
    loss_fn = ScaledMSELoss(15.0)
    optimizer = torch.optim.SGD(net.deltas.parameters(), lr=1e-4, momentum=0.9)

    def lqf_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        optimizer.step()

    layers = net.curvature_layers()
    acc = FactorAccumulator(net.base_network, {n: b is not None for n, (_, b) in layers.items()}, ScaledMSELoss())
    acc.accumulate(x, y)
    for _ in range(args.factor_batches - 1):  # further random batches: a realistic sample count for the ranks
        acc.accumulate(torch.randn_like(x), torch.randint(0, args.classes, (args.batch,)))
    factors = acc.finalize("mean", dtype=torch.float32)
    new = {n: KroneckerInverse(A, G, damping=args.damping, dtype=torch.float32) for n, (A, G) in factors.items()}
    # the same eigenbases and eigenvalues, applied with the full form only
    full = {n: KroneckerInverse.from_eigenbasis(inv.Q_A, inv.Q_G, inv.eigenvalues, args.damping, low_rank=False)
            for n, inv in new.items()}
    lqf_step()  # leaves δ gradients to precondition
    grads = {n: (w.grad.clone(), None if b is None else b.grad.clone()) for n, (w, b) in layers.items()}

    @torch.no_grad()
    def precondition(inverses: dict[str, KroneckerInverse]) -> None:
        # precondition_layer's work (join, apply, split) on the same gradients every time: applying it to its own
        # output would scale them by up to 1/γ per call, into overflow
        for name, (g_w, g_b) in grads.items():
            split_layer(inverses[name].apply(join_layer(g_w, g_b)), g_w.shape, g_b is not None)

    def replan() -> None:  # what a change of LQF's λ costs: new kept sets and coefficients, bases already cast
        for name, (weight, _) in layers.items():
            new[name].with_damping(args.damping).form(weight.dtype, weight.device)

    step_ms = median_ms(lqf_step, args.steps, args.warmup)
    full_ms = median_ms(lambda: precondition(full), args.steps, args.warmup)
    new_ms = median_ms(lambda: precondition(new), args.steps, args.warmup)
    replan_ms = median_ms(replan, args.steps, args.warmup)
    full_macs, new_macs = (sum(inv.plan.macs for inv in d.values()) for d in (full, new))
    low = [inv.plan for inv in new.values() if inv.plan.low_rank]
    kept = sum(r_out * r_in for r_out, r_in in (p.rank for p in low))
    total = sum(d_out * d_in for d_out, d_in in (p.shape for p in low))
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{args.model}, {args.image_size} px, batch {args.batch}, {len(layers)} preconditioned layers, factors "
          f"from {acc.count} samples ({args.factor_batches} batches), damping {args.damping:g}")
    print(f"LQF step                    {step_ms:9.1f} ms")
    for label, ms, macs in (("full form (low_rank=False)", full_ms, full_macs), ("default (low-rank form)", new_ms,
                                                                                 new_macs)):
        print(f"K-FAC {label:28s}{ms:9.1f} ms  {100 * ms / step_ms:7.1f} % of the step  "
              f"({macs / 1e9:.2f} G multiply-adds, any batch size)")
    print(f"low-rank form on {len(low)}/{len(new)} layers (kept eigenvalue pairs r_out·r_in: {kept} of {total}); "
          f"speed-up {full_ms / new_ms:.1f}x; re-plan after with_damping {replan_ms:.1f} ms")


if __name__ == "__main__":
    main()
