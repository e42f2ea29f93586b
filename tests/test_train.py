"""End-to-end jobs through ``lqf_exp.pipeline.run``, the function the CLI calls."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest
import torch

from lqf_exp.code_version import PACKAGE_ROOT
from lqf_exp.pipeline import run
from lqf_exp.report.collect import FACTOR_KEYS as REPORT_FACTOR_KEYS
from lqf_exp.results import ERROR_FILE, METRICS_FILE, atomic_write_json

from .conftest import SMOKE

# metrics.json's factors are the report's factor columns, no more and no fewer.
FACTOR_KEYS = set(REPORT_FACTOR_KEYS)


def expected_code() -> dict | None:
    """The code version a run must record, by git itself: None where the tests run outside a checkout."""
    def git(*args: str) -> str | None:
        done = subprocess.run(["git", *args], cwd=PACKAGE_ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != PACKAGE_ROOT:
        return None
    changed = git("diff", "HEAD", "--name-only", "--", ".", ":!docs/results") or ""
    return {"commit": git("log", "-1", "--format=%H", "--", ".", ":!docs/results"),
            "uncommitted_files": len(changed.splitlines())}


@pytest.mark.parametrize("method", ["finetune", "probe"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_one_batch_run(method: str, loss: str, activation: str, make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg([*SMOKE, f"method={method}", f"loss={loss}", f"activation={activation}"])
    payload = run(cfg)
    written = json.loads((tmp_path / "run" / METRICS_FILE).read_text())
    assert written == json.loads(json.dumps(payload, default=str))
    assert written["status"] == "finished"
    assert set(written["factors"]) == FACTOR_KEYS
    assert written["factors"]["method"] == method and written["factors"]["loss"] == loss
    assert written["factors"]["activation"] == activation
    assert 0.0 <= written["metrics"]["test/acc"] <= 1.0
    assert {"val/acc", "val/loss", "test/acc", "test/loss"} <= set(written["metrics"])
    assert (tmp_path / "run" / "config_resolved.yaml").is_file()
    assert written["code"] == expected_code()  # which code made the result
    # A probe is solved before its first step: nothing to resume, so no checkpoint.
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file() == (method == "finetune")


def test_probe_takes_no_gradient_and_keeps_bn_statistics(make_cfg) -> None:
    from hydra.utils import instantiate

    from lqf_exp.pipeline import build_module

    cfg = make_cfg([*SMOKE, "method=probe"])
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    assert not any(p.requires_grad for p in module.parameters())  # the head is solved, not stepped
    module.train()
    assert not any(m.training for m in module.net.modules())


def test_finished_run_is_skipped_and_rerun_resumes(make_cfg, tmp_path: Path, caplog) -> None:
    # Through network passes (a solve on the Jacobian cache takes one step in its first epoch, and is done).
    passes = [*SMOKE, "method.jacobian_cache_gb=null"]
    cfg = make_cfg([*passes, "skip_finished=true", "resume=true", "trainer.limit_train_batches=2"])
    first = run(cfg)
    metrics_path = tmp_path / "run" / METRICS_FILE
    stamp = metrics_path.stat().st_mtime_ns
    assert run(cfg) == json.loads(metrics_path.read_text())
    assert metrics_path.stat().st_mtime_ns == stamp  # skipped: nothing rewritten

    # An interrupted run (checkpoint, no metrics) resumes from last.ckpt and trains only the missing epoch.
    metrics_path.unlink()
    cfg2 = make_cfg([*passes, "resume=true", "trainer.max_epochs=2", "trainer.limit_train_batches=2"])
    with caplog.at_level(logging.INFO):
        second = run(cfg2)
    assert f"Resuming from {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}" in caplog.text
    assert second["epochs"] == 2 and first["epochs"] == 1
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4  # 2 steps before the interruption + 2 after, none repeated


def test_failed_run_records_its_error(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg([*SMOKE, "data.shots=100000"])
    with pytest.raises(ValueError, match="100000"):
        run(cfg)
    error = json.loads((tmp_path / "run" / ERROR_FILE).read_text())
    assert error["status"] == "failed" and "100000" in error["error"]
    assert error["code"] == expected_code()
    assert not (tmp_path / "run" / METRICS_FILE).exists()


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / METRICS_FILE
    atomic_write_json(path, {"status": "finished", "a": 1})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lqf_exp.results.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(path, {"status": "finished", "a": 2})
    assert json.loads(path.read_text()) == {"status": "finished", "a": 1}
    assert list(tmp_path.iterdir()) == [path]


def test_latest_checkpoint_follows_every_epoch_even_without_improvement(make_cfg, tmp_path: Path) -> None:
    # A negligible lr keeps val/acc flat, so the best checkpoint stays at epoch 0; resuming must not go back there.
    run(make_cfg([*SMOKE, "method=finetune", "optim.lr=1e-12", "trainer.max_epochs=3"]))
    latest = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert latest["epoch"] == 2
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
