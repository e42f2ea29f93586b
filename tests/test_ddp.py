"""trainer=ddp from the CLI on CPU (2 gloo ranks): a run reports what one process reports (the same solve, every
val/test sample scored once), a 2-job multirun in which no child rank re-runs the sweep, and the samplers that make
it so (lqf_exp/data/distributed.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig

from lqf_exp.data.distributed import EvalShard, GlobalBatchShard
from lqf_exp.data.sampling import EpochShuffle
from lqf_exp.pipeline import run

from .test_cli import FAST, run_cli

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
# A small LQF task: 5 training images per class at 8x8 (50 samples: batches of 16, 16, 16 and a tail of 2 that the
# ranks split 1 + 1), scored on all of digits' 143 val and 359 test images; no sanity pass, logger or checkpoints.
SMALL = ["data.shots=5", "data.image_size=8", "data.batch_size=16", "trainer.num_sanity_val_steps=0",
         "logger=none", "callbacks=none"]
VAL_SIZE, TEST_SIZE = 143, 359
MakeCfg = Callable[..., DictConfig]


def offline_runs(job_dir: Path) -> list[Path]:
    return sorted((job_dir / "wandb").glob("offline-run-*"))


def run_pair(tmp_path: Path, overrides: list[str], make_cfg: MakeCfg, monkeypatch: pytest.MonkeyPatch,
             ddp_extra: tuple[str, ...] = (), single_extra: tuple[str, ...] = ()) -> tuple[dict[str, Any], ...]:
    """``metrics.json`` of a run on 2 gloo ranks (``python run.py``) and of one in this process, each process on one
    thread: Lightning gives a CPU rank one, and on 2 busy cores a 2-thread process ran these tiny tensors up to 7x
    slower."""
    out = tmp_path / "ddp"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = run_cli([*overrides, *DDP, *ddp_extra, f"hydra.run.dir={out}"], tmp_path, wandb_mode="offline")
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.loads((out / "metrics.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run(make_cfg([*overrides, *single_extra], tmp_path / "single"))
    finally:
        torch.set_num_threads(threads)
    return ddp, single


def correct(metrics: dict[str, float], split: str) -> int:
    return round(metrics[f"{split}/acc"] * metrics[f"{split}/samples"])


# -- the samplers, in one process -------------------------------------------------------------------------------
def test_ranks_split_each_global_batch() -> None:
    """Rank 0's share of the k-th batch, then rank 1's, is the single-process k-th batch, in every epoch."""
    single, shards = GlobalBatchShard(EpochShuffle(50, 3), 16), [GlobalBatchShard(EpochShuffle(50, 3), 16, r, 2)
                                                                  for r in range(2)]
    for epoch in (0, 1):
        for sampler in (single, *shards):
            sampler.set_epoch(epoch)
        batches = [list(shard) for shard in shards]
        assert [len(b) for b in batches[0]] == [8, 8, 8, 1] and len(shards[1]) == 4
        assert [r0 + r1 for r0, r1 in zip(*batches, strict=True)] == list(single)
        assert sorted(i for b in single for i in b) == list(range(50))
    assert list(single) != list(GlobalBatchShard(EpochShuffle(50, 3), 16))  # epoch 1 is another order


def test_uneven_eval_shards_score_each_sample_once() -> None:
    blocks = [list(EvalShard(143, rank, 2)) for rank in range(2)]
    assert [len(b) for b in blocks] == [71, 72] and blocks[0] + blocks[1] == list(range(143))


def test_impossible_splits_name_the_values() -> None:
    with pytest.raises(ValueError, match=r"data.batch_size=15 .* divisible by 2"):
        GlobalBatchShard(EpochShuffle(50, 0), 15, 0, 2)
    with pytest.raises(ValueError, match="last training batch has 1 sample"):
        GlobalBatchShard(EpochShuffle(49, 0), 16, 1, 2)


# -- DDP against one process -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_passes_equal_single_process_float64(tmp_path: Path, make_cfg: MakeCfg,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Three passes of the adaptive solver at a fixed λ, in float64: the same objective after every pass, and the
    same val/test counts, on the same number of samples."""
    fixed = ["method.weight_decay=0.1", "method.jacobian_cache_gb=null", "method.stop.max_epochs=3",
             "trainer.precision=64-true", "trainer.check_val_every_n_epoch=3"]
    ddp, single = run_pair(tmp_path, [*SMALL, *fixed], make_cfg, monkeypatch)
    histories = [[row["objective"] for row in run_["solver"]["history"]] for run_ in (ddp, single)]
    assert len(histories[0]) == 4  # the start and three passes
    torch.testing.assert_close(torch.tensor(histories[0]), torch.tensor(histories[1]), rtol=1e-6, atol=0.0)
    assert histories[0][-1] < histories[0][0] / 2  # the passes did solve something
    for split, size in (("val", VAL_SIZE), ("test", TEST_SIZE)):
        assert ddp["metrics"][f"{split}/samples"] == single["metrics"][f"{split}/samples"] == size
        assert correct(ddp["metrics"], split) == correct(single["metrics"], split)
        assert ddp["metrics"][f"{split}/loss"] == pytest.approx(single["metrics"][f"{split}/loss"], rel=1e-6)


@pytest.mark.slow
def test_ddp_solve_chooses_the_single_process_weight_decay(tmp_path: Path, make_cfg: MakeCfg,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The default solver and λ=auto, to convergence. Under DDP the dual system and the Jacobian cache are off (they
    serve one process), so the single-process run is held to what DDP does: the validation path, solved through
    network passes. Both pick the same λ and test at most one image apart. The DDP run also shows that rank 1 ran in
    the run's dir and that the job wrote one W&B run."""
    ddp, single = run_pair(tmp_path, SMALL, make_cfg, monkeypatch, ddp_extra=("logger=wandb",),
                           single_extra=("method.weight_decay_selection.max_rows=1", "method.jacobian_cache_gb=null"))
    for run_ in (ddp, single):
        assert run_["status"] == "finished" and run_["solver"]["status"] == "converged"
        assert run_["solver"]["weight_decay_selection"]["method"] == "validation path"
    assert ddp["solver"]["weight_decay"] == single["solver"]["weight_decay"]
    assert ddp["metrics"]["test/samples"] == single["metrics"]["test/samples"] == TEST_SIZE
    assert abs(correct(ddp["metrics"], "test") - correct(single["metrics"], "test")) <= 1
    cache = ddp["solver"]["jacobian_cache"]  # the default 8 GB limit, but the cache serves one process
    assert not cache["used"] and "data parallelism" in cache["why"] and not ddp["solver"]["in_memory"]
    assert (tmp_path / "ddp" / "train_ddp_process_1.log").is_file()
    assert len(offline_runs(tmp_path / "ddp")) == 1


@pytest.mark.slow
def test_ddp_under_multirun(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", *FAST, *DDP, "logger=wandb", "seed=0,1", f"hydra.sweep.dir={sweep}"], tmp_path,
                     wandb_mode="offline")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Launching 2 jobs locally") + result.stderr.count("Launching 2 jobs locally") == 1
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    seeds = set()
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        seeds.add(metrics["factors"]["seed"])
        assert (sweep / job / "train_ddp_process_1.log").is_file()
        assert len(offline_runs(sweep / job)) == 1
    assert seeds == {0, 1}
    assert not any(tmp_path.glob("**/multirun.yaml")) or len(list(tmp_path.glob("**/multirun.yaml"))) == 1
