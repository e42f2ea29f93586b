"""The reading half of ``gpu_check.py``: environment, test images, output parsers, targets and the Markdown summary.

Kept apart so ``gpu_check.py`` is only the runner; nothing here starts a process.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

TARGET_RATIO = 1.7  # LQF step / fine-tuning step, resnet50 224 px batch 64, fp32 and bf16-mixed
TARGET_KFAC_PCT = 10.0  # K-FAC application, % of the LQF step
FUSED = "lqf[all,fused]"


def environment(dry: bool) -> dict[str, Any]:
    """Versions, device and the TF32 settings every step starts from; ``bf16_problem`` says why bf16 cannot run."""
    import torch

    # their import-time settings, if they had any, must show in the TF32 state below
    with contextlib.suppress(Exception):
        import pytorch_lightning  # noqa: F401

        import lqf_exp.linearize  # noqa: F401
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
        "cuda": cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device_name": torch.cuda.get_device_name() if cuda else f"CPU: {cpu_model()} ({os.cpu_count()} cores)",
    }
    tf32 = {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32}
    with contextlib.suppress(AttributeError):  # torch >= 2.9's fp32_precision API, beside the legacy flags
        tf32["cudnn.conv.fp32_precision"] = torch.backends.cudnn.conv.fp32_precision
        tf32["cuda.matmul.fp32_precision"] = torch.backends.cuda.matmul.fp32_precision
    info["tf32"] = tf32
    matmul = tf32["cuda.matmul.allow_tf32"] or tf32["float32_matmul_precision"] != "highest"
    info["tf32_summary"] = (f"matmuls {'TF32' if matmul else 'full fp32'}, convolutions "
                            f"{'TF32' if tf32['cudnn.allow_tf32'] else 'full fp32'} (PyTorch's defaults after "
                            "importing lqf_exp and Lightning; no step changes them)")
    info["bf16_problem"] = None
    if cuda and not dry and not torch.cuda.is_bf16_supported():
        info["bf16_problem"] = f"{info['device_name']} has no bfloat16"
    elif dry:
        try:  # bf16 autocast on the CPU: supported by oneDNN on x86 (emulated without AVX512-BF16)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                torch.nn.functional.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)).sum().item()
        except RuntimeError as err:
            info["bf16_problem"] = f"bf16 autocast does not run on this CPU: {err}"
    return info


def cpu_model() -> str:
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    return platform.processor() or platform.machine()


def make_image_folder(root: Path, classes: int, train: int, test: int, size: int) -> dict[str, Any]:
    """``root/{train,test}/class_<c>/<i>.png``: per class an oriented colour grating plus noise (learnable classes)."""
    from PIL import Image

    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c in range(classes):
        angle, tint = np.pi * c / classes, np.roll(np.array([1.0, 0.6, 0.3]), c)
        for split, count in (("train", train), ("test", test)):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(4, 8)
                wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
                pixels = wave[..., None] * tint + 0.15 * rng.standard_normal((size, size, 3))
                Image.fromarray((255 * pixels.clip(0, 1)).astype(np.uint8)).save(folder / f"{i}.png")
    return {"images": classes * (train + test), "classes": classes, "image_px": size}


# ---- parsers: (output text, step) -> (figures, problem or None) ----------------------------------------------
def parse_pytest(text: str, step: Any) -> tuple[dict[str, Any], str | None]:
    summary = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)\b", ln)
               and re.search(r" in [\d.]+s", ln)]
    if not summary:
        return {}, "no pytest summary line"
    figures: dict[str, Any] = {k: 0 for k in ("passed", "failed", "skipped", "errors")}
    for count, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary[-1]):
        figures["errors" if kind.startswith("error") else kind] = int(count)
    reasons = sorted({m for m in re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", text, re.M)})
    if reasons:
        figures["skip_reasons"] = reasons[:4]
    if step.device == "cuda" and figures["passed"] == 0:
        return figures, "no gpu test ran on the GPU: " + "; ".join(reasons)
    return figures, None


def parse_run(text: str, step: Any) -> tuple[dict[str, Any], str | None]:
    path = Path(step.run_dir) / "metrics.json"
    if not path.is_file():
        return {}, f"no {path}"
    d = json.loads(path.read_text())
    figures = {"test_acc": d.get("metrics", {}).get("test/acc"), "run_s": d.get("duration_s"),
               "device": d.get("device"), "status": d.get("status", "finished"),
               "solver_epochs": (d.get("solver") or {}).get("epochs")}
    if figures["device"] != step.device:
        return figures, f"ran on {figures['device']}, not {step.device}"
    return figures, None


STEP_LINE = re.compile(r"^\s*(\S+): +([\d.]+) ms/step +([\d.]+) img/s +ratio/finetune +([\d.]+)"
                       r"(?:  peak mem +([\d.]+) MiB)?(.*)$", re.M)


def parse_step_time(text: str, step: Any) -> tuple[dict[str, Any], str | None]:
    figures: dict[str, Any] = {}
    for name, ms, _, ratio, peak, rest in STEP_LINE.findall(text):
        figures[f"{name}_ms"] = float(ms)
        if name != "finetune":
            figures[f"{name}_ratio"] = float(ratio)
        if peak:
            figures[f"{name}_peak_mib"] = float(peak)
        if "uncompiled" in rest:
            figures.setdefault("uncompiled", []).append(name)
    for name, seconds in re.findall(r"^compiled (\S+): warm-up step ([\d.]+) s", text, re.M):
        figures[f"{name}_compile_s"] = float(seconds)
    failures = re.findall(r"^compile failed for (.*)$", text, re.M)
    if "finetune_ms" not in figures:
        return figures, "no timing lines in the output"
    if failures:
        figures["compile_failed"] = [f[:200] for f in failures]
        return figures, "compile failed for " + "; ".join(f[:200] for f in failures)
    return figures, None


def parse_kfac(text: str, step: Any) -> tuple[dict[str, Any], str | None]:
    lqf = re.search(r"^LQF step\s+([\d.]+) ms", text, re.M)
    default = re.search(r"^K-FAC default \(low-rank form\)\s+([\d.]+) ms\s+([\d.]+) %", text, re.M)
    full = re.search(r"^K-FAC full form \(low_rank=False\)\s+([\d.]+) ms\s+([\d.]+) %", text, re.M)
    if not (lqf and default):
        return {}, "no LQF step / K-FAC lines in the output"
    figures = {"lqf_step_ms": float(lqf[1]), "kfac_ms": float(default[1]), "kfac_pct": float(default[2])}
    if full:
        figures.update(kfac_full_ms=float(full[1]), kfac_full_pct=float(full[2]))
    return figures, None


# ---- targets and the Markdown summary ------------------------------------------------------------------------
TARGETS = [  # (step, figure, limit, what)
    ("step_time_fp32", f"{FUSED}_ratio", TARGET_RATIO, "LQF/fine-tune step ≤ 1.7×, fp32"),
    ("step_time_bf16", f"{FUSED}_ratio", TARGET_RATIO, "LQF/fine-tune step ≤ 1.7×, bf16-mixed"),
    ("step_time_fp32_compile", f"{FUSED}_ratio", TARGET_RATIO, "LQF/fine-tune step ≤ 1.7×, fp32, compiled"),
    ("step_time_bf16_compile", f"{FUSED}_ratio", TARGET_RATIO, "LQF/fine-tune step ≤ 1.7×, bf16-mixed, compiled"),
    ("kfac_overhead", "kfac_pct", TARGET_KFAC_PCT, "K-FAC application ≤ 10 % of the LQF step"),
]


def evaluate_targets(steps: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    by_name = {s["name"]: s for s in steps}
    out = []
    for name, figure, limit, what in TARGETS:
        s = by_name.get(name, {})
        value = s.get("figures", {}).get(figure) if s.get("status") == "ok" else None
        out.append({"target": what, "step": name, "value": value, "limit": limit, "mode": mode,
                    "met": None if value is None or mode != "gpu" else value <= limit})  # toy sizes meet nothing
    return out


def _figures(figures: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ", ".join(map(str, v)) if isinstance(v, list) else str(v)

    return "; ".join(f"{k} {fmt(v)}" for k, v in figures.items() if k != "skip_reasons")


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# GPU check ({report['mode']}), {report['started']}", ""]
    if report["mode"] == "dry-run":
        lines += ["**Dry run**: toy sizes on the CPU. It checks the script; no figure or target below is a GPU's.", ""]
    lines += [f"- device: {env['device_name']}",
              f"- torch {env['torch']}, CUDA {env['cuda_build']}, cuDNN {env['cudnn']}, Python {env['python']}",
              f"- TF32: {env['tf32_summary']}; flags: " + ", ".join(f"`{k}={v}`" for k, v in env["tf32"].items()),
              f"- command: `{report['command']}`; finished: {report['finished'] or 'not yet'}", "",
              "| step | status | seconds | key figures |", "|---|---|---|---|"]
    for s in report["steps"]:
        status = s["status"] + (f" ({s['reason']})" if s["reason"] else "")
        seconds = "" if s["seconds"] is None else f"{s['seconds']:.1f}"
        lines.append(f"| `{s['name']}`: {s['what']} | {status} | {seconds} | {_figures(s['figures'])} |")
    lines += ["", "| target | step | value | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        met = "not measured" if t["value"] is None else "n/a (dry run)" if t["met"] is None else \
            "met" if t["met"] else "**not met**"
        value = "" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"| {t['target']} | `{t['step']}` | {value} | {met} |")
    for s in report["steps"]:
        if s["output_tail"]:
            lines += ["", f"## `{s['name']}`: {s['status']}, {s['reason']}", "", "```text", f"$ {s['command']}",
                      s["output_tail"], "```", f"(full output: logs/{s['name']}.log)"]
    return "\n".join(lines)
