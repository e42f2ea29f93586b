"""Seconds to forget k training samples of a finished LQF run, per method, against the full retrain.

    python benchmarks/forget_time.py <run dir> --sizes 1 10 100 --methods solve retrain --repeats 3 [--full-retrain]

For each k a seeded random index file is drawn (the same for every method); each method runs ``lqf_exp.forget.forget``
in this process, timed by ``time.perf_counter`` around the call: loading the run, the Jacobian cache or dual system of
the remaining samples, the solve, the evaluation of val/test and the writing of the new run (not Python's start-up or
imports). ``--full-retrain`` also times ``lqf_exp.pipeline.run`` on the run's overrides plus ``data.drop=<file>
method.weight_decay=<λ> logger=none`` (everything a ``python run.py`` does after start-up, the head refit included).
Prints one row per (k, method): the median and every repeat, the test accuracy and the iterations.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from hydra.core.global_hydra import GlobalHydra

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lqf_exp, when run as `python benchmarks/...`

from lqf_exp.config import compose_config  # noqa: E402
from lqf_exp.forget import ForgetOptions, forget  # noqa: E402
from lqf_exp.influence import load_finished_run  # noqa: E402
from lqf_exp.pipeline import run  # noqa: E402


def _full_retrain(run_dir: Path, drop: Path, weight_decay: float, out: Path) -> tuple[float, float]:
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) or [] if overrides_file.is_file() else []
    overrides = [o for o in overrides if not o.startswith(("data.drop=", "method.weight_decay=", "logger="))]
    GlobalHydra.instance().clear()
    cfg = compose_config(overrides + [f"data.drop={drop}", f"method.weight_decay={weight_decay}", "logger=none",
                                      "callbacks.progress_bar.refresh_rate=0"], out)
    GlobalHydra.instance().clear()
    started = time.perf_counter()
    metrics = run(cfg)
    return time.perf_counter() - started, metrics["metrics"]["test/acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--methods", nargs="*", default=["auto", "retrain"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full-retrain", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    finished = load_finished_run(args.run_dir)
    size, weight_decay = len(finished.datamodule.train_dataset), finished.weight_decay  # type: ignore[arg-type]
    del finished
    scratch = Path(tempfile.mkdtemp(prefix="forget_time."))
    print(f"run {args.run_dir}: N = {size}, λ = {weight_decay:g}; scratch {scratch}")
    print("| k | method | median s | runs s | test acc | iterations |\n|---:|---|---:|---|---:|---:|")
    for k in args.sizes:
        drop = scratch / f"drop{k}.txt"
        drop.write_text("".join(f"{i}\n" for i in sorted(random.Random(args.seed).sample(range(size), k))))
        for method in args.methods + (["full retrain"] if args.full_retrain else []):
            seconds, acc, iterations = [], None, "—"
            for repeat in range(args.repeats):
                out = scratch / f"k{k}-{method.replace(' ', '_')}-{repeat}"
                if method == "full retrain":
                    took, acc = _full_retrain(args.run_dir, drop, weight_decay, out)
                else:
                    started = time.perf_counter()
                    _, payload = forget(args.run_dir, drop, None, out, ForgetOptions(method=method))
                    took, acc = time.perf_counter() - started, payload["metrics"]["test/acc"]
                    iterations = f"{payload['forget']['method']}: {payload['forget']['iterations']}"
                seconds.append(took)
            print(f"| {k} | {method} | {statistics.median(seconds):.1f} | {', '.join(f'{s:.1f}' for s in seconds)} | "
                  f"{acc:.4f} | {iterations} |", flush=True)


if __name__ == "__main__":
    main()
