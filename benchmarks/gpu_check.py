"""GPU readiness in one command: tests, runs and benchmarks on one CUDA GPU in under 8 minutes.

    python benchmarks/gpu_check.py                      # one H100/H200; writes outputs/gpu_check/gpu_check.{json,md}
    python benchmarks/gpu_check.py --dry-run            # the same steps at toy sizes on the CPU (compile steps skipped)
    python benchmarks/gpu_check.py --steps run_fp32,kfac_overhead --out DIR

Each step is a subprocess with its own timeout, cut to what is left of ``--budget``, and the JSON and Markdown are
rewritten after every step, so a step that hangs or a slow compile costs only itself (the compile steps run last).
Per step: command, return code, wall seconds, status (ok / failed / timeout / skipped), key figures parsed from
its output, and the tail of its output when it did not succeed (full logs in ``DIR/logs/``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_report import (  # noqa: E402
    environment,
    evaluate_targets,
    make_image_folder,
    markdown,
    parse_kfac,
    parse_pytest,
    parse_run,
    parse_step_time,
)

REPO = Path(__file__).resolve().parents[1]
TAIL_CHARS = 3000
# λ fixed (no selection path) and 2 passes per solve: what bounds an LQF run's time
BOUNDED = ["method.weight_decay=1.0", "method.stop.max_epochs=2"]
MIN_STEP_S = 15.0  # a step that would get less than this of the budget is skipped, not started
# kfac_overhead.py has no --device: run it with CUDA as the default device, and make time.perf_counter synchronize
# so its host-side timer measures the kernels, not their launches.
KFAC_RUNNER = """import runpy, sys, time, torch
if sys.argv[1] == 'cuda':
    torch.set_default_device('cuda')
    _clock = time.perf_counter
    def _synchronized():
        torch.cuda.synchronize()
        return _clock()
    time.perf_counter = _synchronized
sys.argv = ['benchmarks/kfac_overhead.py', *sys.argv[2:]]
runpy.run_path('benchmarks/kfac_overhead.py', run_name='__main__')
"""

Parser = Callable[[str, "Step"], tuple[dict[str, Any], str | None]]  # (output, step) -> (figures, problem or None)


@dataclass
class Step:
    name: str
    what: str
    command: list[str]
    timeout_s: float
    parse: Parser | None = field(default=None, repr=False)
    prepare: Callable[[], dict[str, Any]] | None = field(default=None, repr=False)  # in-process set-up
    run_dir: str | None = None  # a run.py step's hydra.run.dir (metrics.json)
    device: str = "cuda"  # where the step must have run
    status: str = "pending"
    reason: str | None = None
    returncode: int | None = None
    seconds: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    output_tail: str | None = None

    def record(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("parse", "prepare", "command")}
        out["command"] = shlex.join(self.command)
        return out


def build_steps(dry: bool, out: Path, bf16_problem: str | None, with_compile: bool) -> list[Step]:
    """The check's steps: GPU sizes, or toy sizes on the CPU (``dry``)."""
    py = sys.executable
    if dry:  # small model, 32 px, a few images, one batch of each split
        trainer = ["trainer=cpu", "debug=smoke"]  # one batch of each split, no logger
        digits = [*BOUNDED, "data.shots=2", "data.batch_size=16"]
        folder = dict(classes=3, train=10, test=3, size=40)
        folder_run = ["model=small_resnet", "data.image_size=32", "data.resize_size=36", "data.batch_size=8",
                      "data.num_workers=0"]
        timing = ["--model", "resnet18", "--image-size", "32", "--batch", "4", "--device", "cpu", "--steps", "2",
                  "--warmup", "1", "--no-memory"]
        kfac = ["cpu", "--model", "small_resnet", "--image-size", "32", "--batch", "8", "--steps", "2", "--warmup",
                "1", "--factor-batches", "1"]
        tests = "tests/test_gpu.py"  # the whole suite's collection costs time, and others' files may be mid-edit
    else:
        trainer = ["trainer=gpu", "logger=none"]  # no W&B start-up in a check
        digits = []  # the default run as it is
        folder = dict(classes=4, train=30, test=6, size=256)
        folder_run = ["model=resnet50", "data.batch_size=32", "data.num_workers=4"]
        timing = ["--model", "resnet50", "--image-size", "224", "--batch", "64", "--device", "cuda", "--steps", "10",
                  "--warmup", "3"]
        kfac = ["cuda", "--model", "resnet50", "--image-size", "224", "--batch", "64", "--steps", "5", "--warmup",
                "2", "--factor-batches", "2"]
        tests = "tests"
    fixed = ["skip_finished=false", "resume=false"]
    root = out / "imagefolder"

    def run(name: str, what: str, extra: list[str], timeout: float, **kw: Any) -> Step:
        run_dir = out / "runs" / name
        cmd = [py, "run.py", *extra, *fixed, f"hydra.run.dir={run_dir}"]
        return Step(name, what, cmd, timeout, parse_run, run_dir=str(run_dir), **kw)

    def step_time(name: str, what: str, flags: list[str], timeout: float) -> Step:
        cmd = [py, "benchmarks/step_time.py", *timing, "--linearize", "all", *flags]
        return Step(name, what, cmd, timeout, parse_step_time)

    def limit(gpu_s: float) -> float:  # seconds per step; dry: toy sizes, but a loaded 2-core box
        return 120.0 if dry else gpu_s

    bf16 = ["--precision", "bf16-mixed"]
    sized = f"{timing[1]} {timing[3]} px batch {timing[5]}"  # step_time's --model, --image-size, --batch
    steps = [
        Step("gpu_tests", "pytest -m gpu (tests/test_gpu.py: fused vs autodiff, bf16, compile)",
             [py, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", tests], limit(100), parse_pytest),
        run("run_fp32", "python run.py trainer=gpu (the default LQF run)", [*trainer, *digits], limit(75)),
        run("run_bf16", "the same, trainer.precision=bf16-mixed", [*trainer, *digits, "trainer.precision=bf16-mixed"],
            limit(75)),
        run("imagefolder_resnet50", f"{folder_run[0]} model.weights=null data=imagefolder {folder['size']} px 2 passes",
            [*trainer, *folder_run, *BOUNDED, "model.weights=null", "data=imagefolder", f"data.root={root}",
             "trainer.max_epochs=3"], limit(90), prepare=lambda: make_image_folder(root, **folder)),
        step_time("step_time_fp32", f"benchmarks/step_time.py {sized}, fp32", ["--tangent", "fused", "autodiff"],
                  limit(60)),
        step_time("step_time_bf16", f"step_time {sized}, bf16-mixed", ["--tangent", "fused", *bf16], limit(45)),
        Step("kfac_overhead", f"benchmarks/kfac_overhead.py {kfac[2]} {kfac[4]} px batch {kfac[6]}",
             [py, "-c", KFAC_RUNNER, *kfac], limit(60), parse_kfac),
        step_time("step_time_fp32_compile", f"step_time {sized}, fp32 --compile", ["--tangent", "fused", "--compile"],
                  limit(150)),
        step_time("step_time_bf16_compile", f"step_time {sized}, bf16-mixed --compile",
                  ["--tangent", "fused", *bf16, "--compile"], limit(150)),
    ]
    for step in steps:
        step.device = "cpu" if dry else "cuda"
        if dry:
            step.what = step.what.replace("trainer=gpu", "trainer=cpu") + " [dry run]"
        if "bf16" in step.name and bf16_problem is not None:
            step.status, step.reason = "skipped", bf16_problem
        if "compile" in step.name and dry and not with_compile:
            step.status, step.reason = "skipped", ("torch.compile on the CPU takes minutes on 2 cores (inductor's "
                                                   "C++ build); --dry-run --with-compile runs it")
    return steps


def execute(step: Step, timeout: float, logs: Path, env: dict[str, str]) -> None:
    """Run one step in its own process group (killed whole on timeout: data loader and compile workers too)."""
    log = logs / f"{step.name}.log"
    start = time.perf_counter()
    try:
        if step.prepare is not None:
            step.figures.update(step.prepare())
        with open(log, "wb") as f:
            proc = subprocess.Popen(step.command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            try:
                step.returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except BaseException:  # Ctrl-C: do not leave the step running
                os.killpg(proc.pid, signal.SIGKILL)
                raise
    except OSError as err:
        step.status, step.reason = "failed", f"could not run: {err}"
        return
    finally:
        step.seconds = round(time.perf_counter() - start, 1)
    text = log.read_text(errors="replace").replace("\r", "\n")
    problem = None
    if step.returncode is not None and step.parse is not None:  # figures of a failed step help too
        try:
            figures, problem = step.parse(text, step)
            step.figures.update(figures)
        except (ValueError, KeyError, OSError) as err:
            problem = f"output not understood: {type(err).__name__}: {err}"
    if step.returncode is None:
        step.status, step.reason = "timeout", f"killed after {timeout:.0f} s"
    elif step.returncode != 0:
        step.status, step.reason = "failed", f"exit code {step.returncode}"
    else:
        step.status, step.reason = ("failed", problem) if problem else ("ok", None)
    if step.status != "ok":
        lines = [ln for ln in text.splitlines() if ln.strip()]
        step.output_tail = "\n".join(lines[-40:])[-TAIL_CHARS:]


def write(report: dict[str, Any], steps: list[Step], out: Path) -> None:
    """Both files, each replaced atomically: a reader (or a killed check) never sees half a file."""
    report["steps"] = [s.record() for s in steps]
    report["targets"] = evaluate_targets(report["steps"], report["mode"])
    for name, text in (("gpu_check.json", json.dumps(report, indent=2)), ("gpu_check.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text + "\n")
        os.replace(tmp, out / name)


def run_steps(steps: list[Step], out: Path, budget_s: float, report: dict[str, Any]) -> dict[str, Any]:
    """Run the pending steps in order within ``budget_s``; write the JSON and Markdown before and after each."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)  # lqf_exp for every step
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    deadline = time.monotonic() + budget_s
    write(report, steps, out)  # every step listed (pending) from the start
    for step in steps:
        if step.status != "pending":
            continue
        left = deadline - time.monotonic()
        if left < MIN_STEP_S:
            step.status, step.reason = "skipped", f"the check's budget ({budget_s:.0f} s) was spent"
        else:
            step.status = "running"
            write(report, steps, out)
            execute(step, min(step.timeout_s, left), logs, env)
        write(report, steps, out)
    report["finished"] = now()
    write(report, steps, out)
    return report


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "gpu_check")
    p.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (checks the script, not a GPU)")
    p.add_argument("--with-compile", action="store_true", help="dry run: run the compile steps too (minutes)")
    p.add_argument("--steps", default=None, help="comma-separated step names to run; the others are skipped")
    p.add_argument("--budget", type=float, default=None, help="seconds for all steps (default 470 GPU, 480 dry)")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env_info = environment(args.dry_run)
    steps = build_steps(args.dry_run, out, env_info["bf16_problem"], args.with_compile)
    names = [s.name for s in steps]
    wanted = names if args.steps is None else [n.strip() for n in args.steps.split(",") if n.strip()]
    if unknown := sorted(set(wanted) - set(names)):
        p.error(f"unknown step(s) {unknown}; steps: {', '.join(names)}")
    for step in steps:
        if step.name not in wanted and step.status == "pending":
            step.status, step.reason = "skipped", "not selected (--steps)"
        if not args.dry_run and not env_info["cuda"] and step.status == "pending":
            step.status, step.reason = "skipped", "no CUDA device (use --dry-run on a CPU)"
    report = {"mode": "dry-run" if args.dry_run else "gpu", "started": now(), "finished": None,
              "command": shlex.join([sys.executable, *sys.argv]), "host": platform.node(), "environment": env_info}
    budget = args.budget if args.budget is not None else (480.0 if args.dry_run else 470.0)
    run_steps(steps, out, budget, report)
    for s in steps:
        print(f"{s.name:24s} {s.status:8s} {s.seconds or 0:7.1f} s  {s.reason or ''}")
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if all(s.status in ("ok", "skipped") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
