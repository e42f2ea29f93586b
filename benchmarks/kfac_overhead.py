"""Per-step cost of K-FAC preconditioning against the LQF step it preconditions.

    python benchmarks/kfac_overhead.py --model resnet18 --image-size 32 --batch 32
    python benchmarks/kfac_overhead.py --model small_resnet --image-size 32 --batch 64

In one process: the median time of one LQF training step (JVP forward, MSE, backward, SGD on δ) and of
preconditioning every Conv2d/Linear δ gradient with the damped K-FAC inverse (``KroneckerInverse.apply``: four
matrix products per layer, independent of batch size and resolution), their ratio, and the multiply-adds of both.
Factors are estimated on one batch at w0 (type-2 Fisher); their values do not change the cost.
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
from lqf_exp.precond import FactorAccumulator, KroneckerInverse, precondition_layer


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
    args = p.parse_args()
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
    factors = acc.finalize("mean", dtype=torch.float32)
    inverses = {n: KroneckerInverse(A, G, damping=1e-3, dtype=torch.float32) for n, (A, G) in factors.items()}
    lqf_step()  # leaves δ gradients to precondition

    def precondition() -> None:
        for name, (weight, bias) in layers.items():
            precondition_layer(inverses[name], weight, bias)

    step_ms = median_ms(lqf_step, args.steps, args.warmup)
    precond_ms = median_ms(precondition, args.steps, args.warmup)
    dims = [(A.shape[0], G.shape[0]) for A, G in factors.values()]
    precond_macs = sum(2 * (g * g * a + g * a * a) for a, g in dims)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{args.model}, {args.image_size} px, batch {args.batch}, {len(layers)} preconditioned layers")
    print(f"LQF step            {step_ms:9.1f} ms")
    print(f"K-FAC precondition  {precond_ms:9.1f} ms  ({precond_macs / 1e9:.1f} G multiply-adds, any batch size)")
    print(f"overhead            {100 * precond_ms / step_ms:9.1f} %  (target <= 10 %)")


if __name__ == "__main__":
    main()
