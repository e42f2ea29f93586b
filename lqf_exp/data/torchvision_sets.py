"""The paper's public benchmarks that torchvision can read (and mostly download)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torchvision.datasets
from torch.utils.data import Dataset, Subset

from lqf_exp.data.base import ClassificationDataModule, Splits, as_channel_stats
from lqf_exp.data.datasets import CastImages
from lqf_exp.data.sampling import per_class_split
from lqf_exp.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TransformedSubset,
    carve_val,
    imagenet_transform,
)


@dataclass(frozen=True)
class TorchvisionSpec:
    """How to build one torchvision data set and what it expects under ``root``."""

    cls_name: str
    folder: str
    layout: str
    train: dict[str, Any] = field(default_factory=dict)
    val: dict[str, Any] | None = None  # None: val is carved from train
    test: dict[str, Any] | None = None  # None: no official split; per-class split of the one set


SPECS: dict[str, TorchvisionSpec] = {
    "cifar10": TorchvisionSpec(
        "CIFAR10", "cifar-10-batches-py", "the pickles data_batch_1..5, test_batch, batches.meta",
        {"train": True}, None, {"train": False},
    ),
    "cifar100": TorchvisionSpec(
        "CIFAR100", "cifar-100-python", "the pickles train, test, meta",
        {"train": True}, None, {"train": False},
    ),
    "oxford_pets": TorchvisionSpec(
        "OxfordIIITPet", "oxford-iiit-pet", "images/*.jpg and annotations/{trainval,test}.txt",
        {"split": "trainval"}, None, {"split": "test"},
    ),
    "flowers102": TorchvisionSpec(
        "Flowers102", "flowers-102", "jpg/image_*.jpg, imagelabels.mat, setid.mat",
        {"split": "train"}, {"split": "val"}, {"split": "test"},
    ),
    "fgvc_aircraft": TorchvisionSpec(
        "FGVCAircraft", "fgvc-aircraft-2013b", "data/images/*.jpg, data/variants.txt, "
        "data/images_variant_{train,val,test}.txt",
        {"split": "train"}, {"split": "val"}, {"split": "test"},
    ),
    "stanford_cars": TorchvisionSpec(
        "StanfordCars", "stanford_cars", "cars_train/, cars_test/, devkit/ (cars_meta.mat, "
        "cars_train_annos.mat) and cars_test_annos_withlabels.mat; torchvision's download URL is "
        "dead, so fetch these by hand (e.g. from Kaggle)",
        {"split": "train"}, None, {"split": "test"},
    ),
    "caltech256": TorchvisionSpec(
        "Caltech256", "caltech256/256_ObjectCategories", "one folder per category "
        "(001.ak47/001_0001.jpg ... 257.clutter/)",
    ),
}  # fmt: skip


def dataset_targets(ds: Dataset) -> np.ndarray:
    """Labels of a torchvision data set without decoding its images."""
    for attr in ("targets", "_labels", "y"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr), dtype=np.int64)
    if hasattr(ds, "_samples"):  # StanfordCars
        return np.asarray([s[1] for s in ds._samples], dtype=np.int64)
    return np.asarray([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)  # type: ignore[arg-type]


def labels_of(dataset: Dataset) -> list[int]:
    """The labels of ``dataset`` in order, without decoding its images where its wrappers allow (subsets, casts,
    in-memory tensors, torchvision and ImageFolder sets); else by reading every item."""
    if isinstance(dataset, Subset | TransformedSubset):
        labels = labels_of(dataset.dataset if isinstance(dataset, Subset) else dataset.base)
        return [labels[i] for i in dataset.indices]
    if isinstance(dataset, CastImages):
        return labels_of(dataset.base)
    return [int(label) for label in dataset_targets(dataset)]


def dataset_class_names(ds: Dataset, targets: np.ndarray) -> list[str]:
    for attr in ("classes", "categories"):
        names = getattr(ds, attr, None)
        if names:
            return [str(n) for n in names]
    return [str(i) for i in range(int(targets.max()) + 1)]


class TorchvisionDataModule(ClassificationDataModule):
    """One of :data:`SPECS` (``dataset``) read by ``torchvision.datasets`` from ``root``.

    Official val splits are used where they exist (Flowers-102, FGVC-Aircraft); otherwise
    ``val_fraction`` of each train class is carved out (seeded by ``split_seed``). Caltech-256 has
    no official split: per class, ``train_per_class`` random images form the train pool and the
    next ``test_per_class`` (null: all the rest) the test set.
    """

    def __init__(
        self,
        dataset: str,
        name: str | None = None,
        root: str = "data",
        download: bool = False,
        image_size: int = 224,
        resize_size: int = 256,
        mean: float | Sequence[float] = IMAGENET_MEAN,
        std: float | Sequence[float] = IMAGENET_STD,
        augment: bool = True,
        train_per_class: int = 60,
        test_per_class: int | None = 20,
        val_fraction: float = 0.1,
        **kwargs: Any,
    ) -> None:
        if dataset not in SPECS:
            raise ValueError(f"unknown torchvision data set {dataset!r}; known: {sorted(SPECS)}")
        super().__init__(name=name or dataset, val_fraction=val_fraction, **kwargs)
        self.dataset = dataset
        self.spec = SPECS[dataset]
        self.root = str(root)
        self.download = bool(download)
        self.train_per_class = int(train_per_class)
        self.test_per_class = test_per_class
        mean_, std_ = as_channel_stats(mean, "mean"), as_channel_stats(std, "std")
        self.train_transform = imagenet_transform(True, image_size, resize_size, mean_, std_, augment)
        self.eval_transform = imagenet_transform(False, image_size, resize_size, mean_, std_, augment)

    def _missing(self, detail: str = "") -> FileNotFoundError:
        path = Path(self.root) / self.spec.folder
        return FileNotFoundError(
            f"{self.dataset}: torchvision.datasets.{self.spec.cls_name} found no data at {path} "
            f"(data.root={self.root}). It expects {self.spec.folder}/ under the root, holding "
            f"{self.spec.layout}. Put the files there, point data.root at their parent, or set "
            f"data.download=true.{' (' + detail + ')' if detail else ''}"
        )

    def _build(self, split_kwargs: dict[str, Any]) -> Dataset:
        if not self.download and not (Path(self.root) / self.spec.folder).exists():
            # Checked first because some torchvision classes create folders even without download.
            raise self._missing()
        if self.download:
            Path(self.root).mkdir(parents=True, exist_ok=True)
        cls = getattr(torchvision.datasets, self.spec.cls_name)
        try:
            return cls(self.root, download=self.download, **split_kwargs)
        except RuntimeError as err:
            raise self._missing(str(err)) from err

    def load_splits(self) -> Splits:
        spec = self.spec
        base = self._build(spec.train)
        targets = dataset_targets(base)
        class_names = dataset_class_names(base, targets)
        if spec.test is None:
            pool, test_idx = per_class_split(
                targets, self.train_per_class, self.test_per_class, seed=(self.split_seed, 0)
            )
            test: Dataset = TransformedSubset(base, test_idx.tolist(), self.eval_transform)
        else:
            pool = np.arange(len(targets))
            test_base = self._build(spec.test)
            test = TransformedSubset(test_base, range(len(test_base)), self.eval_transform)  # type: ignore[arg-type]
        if spec.val is None:
            train, val, train_targets = carve_val(
                base, pool, targets, self.val_fraction, (self.split_seed, 1),
                self.train_transform, self.eval_transform,
            )  # fmt: skip
        else:
            val_base = self._build(spec.val)
            val = TransformedSubset(val_base, range(len(val_base)), self.eval_transform)  # type: ignore[arg-type]
            train = TransformedSubset(base, pool.tolist(), self.train_transform)
            train_targets = targets[pool]
        return Splits(train, val, test, train_targets, class_names)
