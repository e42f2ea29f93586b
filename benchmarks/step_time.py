"""Time one LQF training step against one ordinary fine-tuning step (same data, same eval-mode BatchNorm).

Example::

    python benchmarks/step_time.py --model resnet18 --image-size 32 --batch 32 --device cpu --linearize all layer4
    python benchmarks/step_time.py --model resnet50 --image-size 224 --batch 64 --device cuda

Peak memory = persistent state (exact bytes of parameters incl. w0 and δ, gradients, momentum) + the peak of one
step above the memory in use before it (measured after a first step). CUDA: ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``. CPU: each method runs alone in a subprocess that resets the kernel's peak-RSS
mark (``/proc/self/clear_refs``) and reports VmHWM minus VmRSS before the step, with glibc's mmap threshold fixed
at 64 KiB so freed tensors leave the RSS (approximate; falls back to ``getrusage`` ru_maxrss).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lqf_exp.linearize import LinearizedNetwork  # noqa: E402

ALPHA = 15.0  # MSE target scale of the paper


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50"])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--linearize", nargs="+", default=["all", "layer4"], help="one LQF variant per value")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave default)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--mem-only", default=None, help=argparse.SUPPRESS)  # internal: CPU memory subprocess
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[nn.Module, Tensor, Tensor]:
    """Random-weight network in eval mode, a fixed batch and its scaled one-hot targets."""
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    net = getattr(torchvision.models, args.model)(num_classes=args.num_classes).eval()
    net = net.to(device=args.device, dtype=dtype)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device, dtype=dtype)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=args.device)
    y = ALPHA * nn.functional.one_hot(labels, args.num_classes).to(dtype)
    return net, x, y


class Step:
    """One training step: forward, MSE (per-sample sum over classes, mean over batch), backward, SGD."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        self.model, self.x, self.y = model, x, y
        self.opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def __call__(self) -> None:
        loss = (self.model(self.x) - self.y).pow(2).sum(1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def state_mb(self) -> float:
        """Exact size of what persists between steps: parameters (w0 and δ), gradients, momentum."""
        tensors = [p for p in self.model.parameters()] + [p.grad for p in self.model.parameters()]
        tensors += [v for st in self.opt.state.values() for v in st.values() if isinstance(v, Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None) / 2**20


def make_steps(args: argparse.Namespace) -> tuple[dict[str, Step], Tensor]:
    net, x, y = build(args)
    steps = {"finetune": Step(net, x, y)}
    for lin in args.linearize:
        steps[f"lqf[{lin}]"] = Step(LinearizedNetwork(copy.deepcopy(net), linearize=lin), x, y)
    return steps, x


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(args: argparse.Namespace, steps: dict[str, Step]) -> dict[str, float]:
    """Median seconds per step; methods are interleaved so background load hits all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            sync(args.device)
            t0 = time.perf_counter()
            step()
            sync(args.device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM); needs Linux >= 4.0."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cuda_peak_mb(step: Step) -> float:
    step()  # allocate optimizer state and cached buffers first
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cpu_peak_mb(args: argparse.Namespace, method: str) -> float:
    """Run one method alone in a subprocess (peak RSS is per process and never goes down)."""
    flags = {
        "--mem-only": method,
        "--model": args.model,
        "--image-size": args.image_size,
        "--batch": args.batch,
        "--num-classes": args.num_classes,
        "--dtype": args.dtype,
        "--threads": args.threads,
        "--device": "cpu",
    }
    argv = [sys.executable, __file__, *(str(v) for kv in flags.items() for v in kv)]
    # Fixed mmap threshold: big blocks go back to the OS on free, so RSS follows live tensors, not malloc's cache.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def mem_only(args: argparse.Namespace) -> None:
    args.linearize = [] if args.mem_only == "finetune" else [args.mem_only]
    steps, _ = make_steps(args)
    step = steps["finetune" if args.mem_only == "finetune" else f"lqf[{args.mem_only}]"]
    del steps
    step()  # first step: optimizer state, oneDNN/thread-pool set-up; not part of a step's working memory
    before = _status_mb("VmRSS")
    if not reset_peak_rss():  # fall back to the process-lifetime peak
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
        print(json.dumps({"peak_mb": peak}))
        return
    step()
    print(json.dumps({"peak_mb": _status_mb("VmHWM") - before}))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mem_only is not None:
        mem_only(args)
        return
    steps, x = make_steps(args)
    med = time_steps(args, steps)
    mem: dict[str, float] = {}
    if not args.no_memory:
        for name, step in steps.items():
            if args.device == "cuda":
                peak = cuda_peak_mb(step)
            else:
                peak = cpu_peak_mb(args, name if name == "finetune" else name[4:-1])
            mem[name] = step.state_mb() + peak
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.model} {args.image_size}px batch {args.batch} {args.dtype} on {dev}, torch {torch.__version__}")
    print(f"median over {args.steps} steps after {args.warmup} warm-up; peak mem = persistent state + step peak")
    ft = med["finetune"]
    for name, t in med.items():
        line = f"{name:>14}: {t * 1e3:8.1f} ms/step  {args.batch / t:8.1f} img/s  ratio/finetune {t / ft:5.2f}"
        if name in mem:
            line += f"  peak mem {mem[name]:8.1f} MiB (x{mem[name] / mem['finetune']:.2f})"
        print(line)


if __name__ == "__main__":
    main()
