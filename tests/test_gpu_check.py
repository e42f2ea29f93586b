"""benchmarks/gpu_check.py: a step that hangs costs only itself, the files are rewritten after every step, the output
parsers read the benchmarks' real lines, and a dry run of a representative subset of steps finishes on the CPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
STEPS = ["gpu_tests", "run_fp32", "run_bf16", "imagefolder_resnet50", "step_time_fp32", "step_time_bf16",
         "kfac_overhead", "step_time_fp32_compile", "step_time_bf16_compile"]


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_step_that_times_out_leaves_the_others_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gc = load()
    py = sys.executable
    # the second step reads the JSON while it runs: the first step's result must already be there
    peek = "import json, sys, time; print([s['status'] for s in json.load(open(sys.argv[1]))['steps']]); " \
           "sys.stdout.flush(); time.sleep(60)"
    steps = [
        gc.Step("first", "prints", [py, "-c", "print('first done')"], 30, device="cpu"),
        gc.Step("fails", "exits 3", [py, "-c", "import sys; print('boom'); sys.exit(3)"], 30, device="cpu"),
        # its own timeout is 30 s; the check's 4 s budget cuts it
        gc.Step("hangs", "peeks, then sleeps", [py, "-c", peek, str(tmp_path / "gpu_check.json")], 30, device="cpu"),
        gc.Step("late", "never starts", [py, "-c", "pass"], 30, device="cpu"),
    ]
    report = {"mode": "dry-run", "started": "now", "finished": None, "command": "test", "host": "test",
              "environment": {"device_name": "cpu", "torch": "x", "cuda_build": None, "cudnn": None, "python": "3",
                              "tf32": {}, "tf32_summary": "n/a"}}
    monkeypatch.setattr(gc, "MIN_STEP_S", 1.0)
    gc.run_steps(steps, tmp_path, budget_s=4.0, report=report)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    by_name = {s["name"]: s for s in saved["steps"]}
    assert [s["name"] for s in saved["steps"]] == ["first", "fails", "hangs", "late"]
    assert by_name["first"]["status"] == "ok" and by_name["first"]["returncode"] == 0
    hung = by_name["hangs"]
    assert hung["status"] == "timeout" and hung["returncode"] is None and 1.0 < hung["seconds"] < 10
    assert "['ok', 'failed', 'running', 'pending']" in hung["output_tail"]  # written before it started
    assert by_name["fails"]["status"] == "failed" and by_name["fails"]["returncode"] == 3
    assert "boom" in by_name["fails"]["output_tail"]
    assert by_name["late"]["status"] == "skipped" and "budget" in by_name["late"]["reason"]
    assert saved["finished"] is not None
    md = (tmp_path / "gpu_check.md").read_text()
    assert all(f"`{name}`" in md for name in by_name) and "timeout" in md


def test_parsers_read_the_benchmarks_lines() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check_report as r

    step = type("S", (), {"device": "cuda", "run_dir": None})()
    timing = ("compiled finetune: warm-up step 81.5 s (excluded), 1 graph(s), 0 graph break(s)\n"
              "    finetune:   5758.3 ms/step       0.7 img/s  ratio/finetune  1.00  peak mem   150.4 MiB (x1.00)\n"
              "  lqf[all,fused]:   8279.8 ms/step       0.5 img/s  ratio/finetune  1.44  [uncompiled: compile failed]\n"
              "compile failed for lqf[all,fused]: AttributeError: no forward\n")
    figures, problem = r.parse_step_time(timing, step)
    assert figures["finetune_ms"] == 5758.3 and figures["lqf[all,fused]_ratio"] == 1.44
    assert figures["finetune_peak_mib"] == 150.4 and figures["finetune_compile_s"] == 81.5
    assert figures["uncompiled"] == ["lqf[all,fused]"] and problem.startswith("compile failed for lqf[all,fused]")
    kfac = ("LQF step                        169.0 ms\n"
            "K-FAC full form (low_rank=False)    1262.0 ms    746.7 % of the step  (90.70 G multiply-adds)\n"
            "K-FAC default (low-rank form)        225.0 ms    133.1 % of the step  (14.40 G multiply-adds)\n")
    assert r.parse_kfac(kfac, step)[0] == {"lqf_step_ms": 169.0, "kfac_ms": 225.0, "kfac_pct": 133.1,
                                          "kfac_full_ms": 1262.0, "kfac_full_pct": 746.7}
    figures, problem = r.parse_pytest("SKIPPED [2] tests/test_gpu.py:71: needs 1 CUDA device(s), found 0\n"
                                      "5 skipped in 4.41s\n", step)
    assert figures["skipped"] == 5 and figures["passed"] == 0 and "needs 1 CUDA" in problem  # on a GPU: a failure
    assert r.parse_pytest("1 failed, 4 passed, 1 warning in 23.91s", step)[0]["failed"] == 1
    targets = r.evaluate_targets([{"name": "step_time_fp32", "status": "ok", "figures": {"lqf[all,fused]_ratio": 1.2}},
                                  {"name": "kfac_overhead", "status": "failed", "figures": {"kfac_pct": 3.0}}], "gpu")
    met = {t["step"]: t["met"] for t in targets}
    assert met["step_time_fp32"] is True and met["kfac_overhead"] is None and met["step_time_bf16"] is None


@pytest.mark.slow
def test_dry_run_of_a_subset_lists_every_step(tmp_path: Path) -> None:
    subset = "gpu_tests,step_time_fp32,kfac_overhead"  # one pytest step and both benchmarks' parsers
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--steps", subset, "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=400)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    md = (tmp_path / "gpu_check.md").read_text()
    assert [s["name"] for s in report["steps"]] == STEPS
    for s in report["steps"]:
        assert s["status"] == "ok" or (s["status"] == "skipped" and s["reason"]), (s, proc.stdout[-2000:])
        assert f"`{s['name']}`" in md
    ran = {s["name"]: s for s in report["steps"] if s["status"] == "ok"}
    assert set(ran) == set(subset.split(","))
    assert ran["step_time_fp32"]["figures"]["lqf[all,fused]_ratio"] > 0
    assert ran["kfac_overhead"]["figures"]["kfac_pct"] > 0
    assert report["environment"]["tf32"] and "TF32" in md and proc.returncode == 0
