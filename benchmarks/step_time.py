"""Time one LQF training step against one ordinary fine-tuning step (same data, same eval-mode BatchNorm).

Example::

    python benchmarks/step_time.py --model resnet18 --image-size 32 --batch 32 --device cpu --linearize all layer4
    python benchmarks/step_time.py --threads 1 --linearize all layer4 --no-unfold
    python benchmarks/step_time.py --threads 1 --linearize all --tangent fused --precision bf16-mixed
    python benchmarks/step_time.py --model resnet50 --image-size 224 --batch 64 --device cuda --channels-last --compile
    python benchmarks/step_time.py --model vit_tiny --linearize all attention --no-memory
    python benchmarks/step_time.py --model vit_b_16 --image-size 224 --batch 4 --linearize all attention --steps 5 \
        --warmup 1 --no-memory

One LQF variant per (``--linearize``, ``--tangent``) pair, named ``lqf[all,fused]``, ``lqf[layer4,autodiff]``...
``--precision``, ``--channels-last`` and ``--compile`` apply to every method, fine-tuning included; ``--no-unfold``
only changes the fused tangent path (``lqf_exp.tangent_ops.UNFOLD_MAX_POSITIONS = 0``: oneDNN's weight gradient
everywhere, as stock fine-tuning does), so comparing a run with and without it shows how much of the fused
LQF/fine-tune ratio is the unfold weight-gradient schedule.

Peak memory = persistent state (exact bytes of parameters incl. w0 and δ, gradients, momentum) + the peak of one
step above the memory in use before it (measured after a first step). CUDA: ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``. CPU: each method runs alone in a subprocess (with the same flags) that resets
the kernel's peak-RSS mark (``/proc/self/clear_refs``) and reports VmHWM minus VmRSS before the step, with glibc's
mmap threshold fixed at 64 KiB so freed tensors leave the RSS (approximate; falls back to ``getrusage`` ru_maxrss).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lqf_exp.tangent_ops as tangent_ops  # noqa: E402
from lqf_exp.linearize import TANGENT_PATHS, LinearizedNetwork  # noqa: E402
from lqf_exp.models import build_network  # noqa: E402
from lqf_exp.models.build import TRANSFORMERS  # noqa: E402
from lqf_exp.models.heads import head_name  # noqa: E402

ALPHA = 15.0  # MSE target scale of the paper
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # Lightning's precision names
FINETUNE = "finetune"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50", "vit_tiny", "vit_b_16"],
                   help="torchvision's ResNets as they are; vit_tiny (32 px) and vit_b_16 (224 px) through "
                        "lqf_exp.models.build_network (GELU, explicit q/k/v/out Linear attention)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--linearize", nargs="+", default=["all", "layer4"], help="one LQF variant per value and tangent")
    p.add_argument("--tangent", nargs="+", default=["fused", "autodiff"], choices=TANGENT_PATHS,
                   help="LinearizedNetwork tangent paths to time (autodiff is skipped under mixed precision)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="parameter dtype")
    p.add_argument("--precision", default="32", choices=["32", *AUTOCAST_DTYPES],
                   help="mixed: forward + loss under torch.autocast (parameters stay --dtype); 16-mixed: cuda only")
    p.add_argument("--channels-last", action="store_true", help="network and input in torch.channels_last")
    p.add_argument("--compile", action="store_true", help="torch.compile each method's forward module")
    p.add_argument("--no-unfold", action="store_true",
                   help="fused path: lqf_exp.tangent_ops.UNFOLD_MAX_POSITIONS = 0 (oneDNN weight gradients everywhere)")
    p.add_argument("--prefix-cache", action="store_true",
                   help="LQF variants with a frozen prefix (linearize=<block>) run on its features, computed once "
                        "(lqf_exp.prefix_cache): the cost of a solver pass on stored features")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave default)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--mem-only", default=None, help=argparse.SUPPRESS)  # internal: CPU memory subprocess
    args = p.parse_args(argv)
    if args.precision == "16-mixed" and args.device != "cuda":
        p.error("--precision 16-mixed needs --device cuda (CPU autocast is bfloat16; use bf16-mixed)")
    if args.precision != "32" and args.dtype != "float32":
        p.error("mixed precision needs --dtype float32 (autocast only lowers float32 operations)")
    return args


# ---- methods -----------------------------------------------------------------------------------------------
def lqf_name(linearize: str, tangent: str) -> str:
    return f"lqf[{linearize},{tangent}]"


def parse_lqf_name(name: str) -> tuple[str, str]:
    """``lqf[all,fused]`` -> ``("all", "fused")``."""
    linearize, tangent = name[len("lqf[") : -1].split(",")
    return linearize, tangent


def method_names(args: argparse.Namespace, announce: bool = True) -> list[str]:
    """finetune, then one LQF variant per (linearize, tangent); autodiff is dropped under autocast."""
    names = [FINETUNE]
    for lin in args.linearize:
        for tan in args.tangent:
            if tan == "autodiff" and args.precision != "32":
                if announce:
                    print(f"note: {lqf_name(lin, tan)} skipped: tangent=autodiff raises under autocast "
                          f"(--precision {args.precision}; PyTorch forward-mode AD mixes dtypes at eval BatchNorm); "
                          "the fused path runs mixed precision, ViTs included")
                continue
            names.append(lqf_name(lin, tan))
    return names


def build(args: argparse.Namespace) -> tuple[nn.Module, Tensor, Tensor]:
    """Random-weight network in eval mode, a fixed batch and its scaled one-hot targets."""
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    if args.model in TRANSFORMERS:
        net = build_network(args.model, args.num_classes, activation="gelu", weights=None).eval()
    else:
        net = getattr(torchvision.models, args.model)(num_classes=args.num_classes).eval()
    net = net.to(device=args.device, dtype=dtype)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device, dtype=dtype)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)  # before any copy: LQF's w0 and δ inherit the layout
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=args.device)
    y = ALPHA * nn.functional.one_hot(labels, args.num_classes).to(dtype)
    return net, x, y


def autocast_context(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    if args.precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(args.device, dtype=AUTOCAST_DTYPES[args.precision])


class Step:
    """One training step: forward and MSE (per-sample sum over classes, mean over batch) under the precision's
    autocast, backward, SGD with momentum. ``forward`` is ``module`` or its compiled version."""

    def __init__(self, module: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace) -> None:
        self.module, self.x, self.y, self.args = module, x, y, args
        self.forward: Callable[[Tensor], Tensor] = module
        self.compiled = False
        self.opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def __call__(self) -> None:
        with autocast_context(self.args):
            loss = (self.forward(self.x) - self.y).pow(2).sum(1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def prime(self) -> None:
        """One eager forward: LinearizedNetwork's first-call checks (fused vs forward-mode AD, call order) run
        here, outside any compiled graph."""
        with torch.no_grad(), autocast_context(self.args):
            self.module(self.x)

    def state_mb(self) -> float:
        """Exact size of what persists between steps: parameters (w0 and δ), gradients, momentum."""
        tensors = [p for p in self.module.parameters()] + [p.grad for p in self.module.parameters()]
        tensors += [v for st in self.opt.state.values() for v in st.values() if isinstance(v, Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None) / 2**20


def make_step(args: argparse.Namespace, name: str, net: nn.Module, x: Tensor, y: Tensor) -> Step:
    if name == FINETUNE:
        return Step(net, x, y, args)
    linearize, tangent = parse_lqf_name(name)
    linearized = LinearizedNetwork(copy.deepcopy(net), linearize=linearize, tangent=tangent, head_name=head_name(net))
    if args.prefix_cache and len(linearized.prefix):  # the prefix's features computed once, as the LQF module does
        with torch.no_grad():
            return Step(linearized.on_prefix_features(), linearized.prefix(x), y, args)
    return Step(linearized, x, y, args)


def make_steps(args: argparse.Namespace, names: list[str]) -> dict[str, Step]:
    net, x, y = build(args)
    steps = {name: make_step(args, name, net, x, y) for name in names}  # LQF copies net before any step
    for step in steps.values():
        step.prime()
    return steps


# ---- torch.compile -----------------------------------------------------------------------------------------
def _dynamo_counts() -> str:
    """Graphs and graph breaks dynamo recorded since the last reset (best effort: private counters)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return ""
    breaks = sum(counters["graph_break"].values())
    return f"{counters['stats']['unique_graphs']} graph(s), {breaks} graph break(s)"


def _reset_dynamo() -> None:
    with contextlib.suppress(ImportError):
        from torch._dynamo.utils import counters

        counters.clear()


def compile_step(name: str, step: Step, quiet: bool = False) -> float | None:
    """``torch.compile`` the step's forward module and run one step (the compile warm-up, timed and returned).
    On failure: print the error's first line, keep the step eager and return None."""
    _reset_dynamo()
    step.forward = torch.compile(step.module)
    t0 = time.perf_counter()
    try:
        step()
        sync(step.args.device)
    except Exception as err:  # noqa: BLE001  # any compile failure leaves that method eager
        first = (str(err).strip().splitlines() or [""])[0]
        print(f"compile failed for {name}: {type(err).__name__}: {first[:300]}", file=sys.stderr if quiet else None)
        step.forward, step.compiled = step.module, False
        return None
    seconds = time.perf_counter() - t0
    step.compiled = True
    if not quiet:
        print(f"compiled {name}: warm-up step {seconds:.1f} s (excluded), {_dynamo_counts()}")
    return seconds


# ---- timing ------------------------------------------------------------------------------------------------
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


# ---- memory ------------------------------------------------------------------------------------------------
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


def config_flags(args: argparse.Namespace) -> list[str]:
    """The command-line flags that define what one step computes (for the memory subprocess)."""
    flags = ["--model", args.model, "--image-size", str(args.image_size), "--batch", str(args.batch),
             "--num-classes", str(args.num_classes), "--dtype", args.dtype, "--threads", str(args.threads),
             "--precision", args.precision, "--device", "cpu"]
    switches = {"--channels-last": args.channels_last, "--compile": args.compile, "--no-unfold": args.no_unfold,
                "--prefix-cache": args.prefix_cache}
    return flags + [flag for flag, on in switches.items() if on]


def cpu_peak_mb(args: argparse.Namespace, method: str) -> float:
    """Run one method alone in a subprocess (peak RSS is per process and never goes down)."""
    argv = [sys.executable, __file__, "--mem-only", method, *config_flags(args)]
    # Fixed mmap threshold: big blocks go back to the OS on free, so RSS follows live tensors, not malloc's cache.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def mem_only(args: argparse.Namespace) -> None:
    step = make_steps(args, [args.mem_only])[args.mem_only]
    if args.compile:
        compile_step(args.mem_only, step, quiet=True)  # its first step is the compile warm-up
    step()  # first (or next) step: optimizer state, oneDNN/thread-pool set-up; not part of a step's working memory
    before = _status_mb("VmRSS")
    if not reset_peak_rss():  # fall back to the process-lifetime peak
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
        print(json.dumps({"peak_mb": peak}))
        return
    step()
    print(json.dumps({"peak_mb": _status_mb("VmHWM") - before}))


def peak_memory(args: argparse.Namespace, steps: dict[str, Step]) -> dict[str, float]:
    mem = {}
    for name, step in steps.items():
        peak = cuda_peak_mb(step) if args.device == "cuda" else cpu_peak_mb(args, name)
        mem[name] = step.state_mb() + peak
    return mem


# ---- report ------------------------------------------------------------------------------------------------
def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    return f"{model} ({os.cpu_count()} cores)"


def header(args: argparse.Namespace) -> Iterator[str]:
    unfold = "off (--no-unfold)" if args.no_unfold else f"<= {tangent_ops.UNFOLD_MAX_POSITIONS} positions"
    yield (f"{args.model} {args.image_size}px batch {args.batch} {args.dtype} on {args.device}, "
           f"torch {torch.__version__}")
    yield (f"machine: {machine(args.device)}; threads {torch.get_num_threads()}; precision {args.precision}; "
           f"channels-last {'on' if args.channels_last else 'off'}; compile {'on' if args.compile else 'off'}; "
           f"fused unfold weight-gradient {unfold}; prefix cache {'on' if args.prefix_cache else 'off'}")
    yield f"median over {args.steps} steps after {args.warmup} warm-up; peak mem = persistent state + step peak"


def report(args: argparse.Namespace, steps: dict[str, Step], med: dict[str, float], mem: dict[str, float]) -> None:
    for line in header(args):
        print(line)
    ft = med[FINETUNE]
    for name, t in med.items():
        line = f"{name:>20}: {t * 1e3:8.1f} ms/step  {args.batch / t:8.1f} img/s  ratio/finetune {t / ft:5.2f}"
        if name in mem:
            line += f"  peak mem {mem[name]:8.1f} MiB (x{mem[name] / mem[FINETUNE]:.2f})"
        if args.compile and not steps[name].compiled:
            line += "  [uncompiled: compile failed]"
        print(line)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_unfold:
        tangent_ops.UNFOLD_MAX_POSITIONS = 0
    if args.mem_only is not None:
        mem_only(args)
        return
    steps = make_steps(args, method_names(args))
    if args.compile:
        for name, step in steps.items():
            compile_step(name, step)
    med = time_steps(args, steps)
    mem = {} if args.no_memory else peak_memory(args, steps)
    report(args, steps, med, mem)


if __name__ == "__main__":
    main()
