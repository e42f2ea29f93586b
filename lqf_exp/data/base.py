"""Base data module: split bookkeeping, k-shot subsetting, seeded loaders."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lqf_exp.data.datasets import CastImages
from lqf_exp.data.distributed import EvalShard, GlobalBatchShard, rank_and_world
from lqf_exp.data.sampling import EpochShuffle, check_shots, k_shot_indices


@dataclass
class Splits:
    """What a subclass loads: the three splits, the train labels (in order) and the class names."""

    train: Dataset
    val: Dataset
    test: Dataset
    train_targets: np.ndarray
    class_names: list[str]


def as_channel_stats(value: float | Sequence[float], what: str) -> tuple[float, float, float]:
    """Broadcast a scalar or a 3-sequence (lists from Hydra included) to three channel values."""
    if isinstance(value, int | float):
        return (float(value),) * 3
    values = [float(v) for v in value]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ValueError(f"{what} must be a number or a list of 3 numbers, got {list(value)}")
    return tuple(values)  # type: ignore[return-value]


# data.dtype: float64 images feed a trainer.precision=64-true run, whose network is float64 end to end (checks that
# two runs agree to rounding, e.g. DDP against one process, need it: float32 rounding grows along a solve).
_IMAGE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def kept_indices(drop_file: Path, size: int) -> list[int]:
    """The training-set positions not listed in ``drop_file`` (one integer per line), in order; a clear error for
    a malformed, out-of-range or duplicated entry, or a file that drops everything."""
    try:
        dropped = [int(line) for line in drop_file.read_text().split()]
    except ValueError as error:
        raise ValueError(f"data.drop={str(drop_file)!r}: expected one integer index per line ({error})") from None
    bad = [i for i in dropped if not 0 <= i < size]
    if bad:
        raise ValueError(f"data.drop={str(drop_file)!r}: indices {bad[:5]} outside the training set [0, {size})")
    if len(set(dropped)) != len(dropped):
        raise ValueError(f"data.drop={str(drop_file)!r}: an index is listed twice")
    if len(dropped) >= size:
        raise ValueError(f"data.drop={str(drop_file)!r} drops all {size} training samples")
    gone = set(dropped)
    return [i for i in range(size) if i not in gone]


class ClassificationDataModule(pl.LightningDataModule):
    """Image classification data with train / val / test splits and an optional k-shot train subset.

    Subclasses implement :meth:`load_splits`. ``setup`` loads everything once (later calls are
    no-ops). ``shots`` keeps exactly k seeded images per class of the *train* split only; the val and
    test splits depend on ``split_seed`` alone. The train loader shuffles with a generator seeded
    by ``shuffle_seed`` (default: ``shots_seed``, i.e. the run seed); ``batch_size`` is the global batch, which
    data-parallel ranks split (:mod:`lqf_exp.data.distributed`).
    """

    def __init__(
        self,
        name: str = "data",
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shots: int | None = None,
        shots_seed: int = 0,
        split_seed: int = 0,
        val_fraction: float = 0.1,
        shuffle_seed: int | None = None,
        pin_memory: bool | None = None,
        drop: str | None = None,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        if dtype not in _IMAGE_DTYPES:
            raise ValueError(f"data.dtype must be one of {sorted(_IMAGE_DTYPES)}, got {dtype!r}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} / {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.name = str(name)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else self.batch_size
        self.num_workers = int(num_workers)
        self.shots = check_shots(shots)
        self.shots_seed = int(shots_seed)
        self.split_seed = int(split_seed)
        self.val_fraction = float(val_fraction)
        self.shuffle_seed = int(shuffle_seed) if shuffle_seed is not None else self.shots_seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.drop = None if drop is None else Path(drop)
        if self.drop is not None and not self.drop.is_file():
            raise FileNotFoundError(f"data.drop={drop!r}: no such file (one training-set index per line)")
        self.dtype = _IMAGE_DTYPES[dtype]
        self._splits: Splits | None = None
        self._train: Dataset | None = None

    # -- to implement -------------------------------------------------------------------------
    def load_splits(self) -> Splits:
        """Load the full train / val / test splits (before any k-shot subsetting)."""
        raise NotImplementedError

    # -- Lightning hooks ----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        splits = self.load_splits()
        train: Dataset = splits.train
        if self.shots is not None:
            idx = k_shot_indices(
                splits.train_targets,
                self.shots,
                seed=self.shots_seed,
                num_classes=len(splits.class_names),
                class_names=splits.class_names,
            )
            train = Subset(splits.train, idx.tolist())
        if self.drop is not None:
            train = Subset(train, kept_indices(self.drop, len(train)))  # type: ignore[arg-type]
        if self.dtype != torch.float32:
            train = CastImages(train, self.dtype)
            splits = replace(splits, val=CastImages(splits.val, self.dtype), test=CastImages(splits.test, self.dtype))
        self._train = train
        self._splits = splits

    def _require(self) -> Splits:
        if self._splits is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must be called first")
        return self._splits

    @property
    def num_classes(self) -> int:
        return len(self._require().class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self._require().class_names)

    @property
    def train_dataset(self) -> Dataset:
        self._require()
        assert self._train is not None
        return self._train

    @property
    def val_dataset(self) -> Dataset:
        return self._require().val

    @property
    def test_dataset(self) -> Dataset:
        return self._require().test

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        """A loader of this rank's share (all of it in one process): a shuffled split as shares of the global
        batches of the single-process order, an evaluation split as a contiguous unpadded block (distributed.py)."""
        rank, world = rank_and_world(self.trainer)  # None until a Trainer attaches this module
        options: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": self.pin_memory,
                                   "persistent_workers": self.num_workers > 0}
        if shuffle:
            order = EpochShuffle(len(dataset), self.shuffle_seed)  # type: ignore[arg-type]
            return DataLoader(dataset, batch_sampler=GlobalBatchShard(order, batch_size, rank, world), **options)
        sampler = EvalShard(dataset, rank, world) if world > 1 else None  # type: ignore[arg-type]
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **options)

    def train_dataloader(self) -> DataLoader:
        """Batches of ``batch_size`` (the global batch: under data parallelism each rank gets its share)."""
        return self._loader(self.train_dataset, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """``eval_batch_size`` per loader batch, of this rank's block of the split (every sample scored once)."""
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, self.eval_batch_size, shuffle=False)

    def describe(self) -> dict[str, Any]:
        """Flat summary for logging (sizes are after k-shot subsetting)."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "shots": self.shots,
            "shots_seed": self.shots_seed,
            "split_seed": self.split_seed,
            "dropped": None if self.drop is None else self.drop.name,
            "train_size": len(self.train_dataset),  # type: ignore[arg-type]
            "val_size": len(self.val_dataset),  # type: ignore[arg-type]
            "test_size": len(self.test_dataset),  # type: ignore[arg-type]
        }
