"""Any data set arranged as ``root/{train,test}/<class>/<image>`` (optionally ``root/val/``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from lqf_exp.data.base import ClassificationDataModule, Splits, as_channel_stats
from lqf_exp.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TransformedSubset,
    carve_val,
    imagenet_transform,
)

LAYOUT = "root/train/<class>/*.jpg, root/test/<class>/*.jpg and optionally root/val/<class>/*.jpg"


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class ImageFolderDataModule(ClassificationDataModule):
    """Images in class folders (MIT-67, CUB-200, Stanford Dogs, Chest X-Ray, Malaria Cells, ...).

    Class indices follow the sorted folder names of ``train/``; ``test/`` (and ``val/``, if present)
    must hold the same class folders. Without ``val/``, ``val_fraction`` of each train class is
    carved out (seeded by ``split_seed``).
    """

    def __init__(
        self,
        root: str,
        name: str = "imagefolder",
        image_size: int = 224,
        resize_size: int = 256,
        mean: float | Sequence[float] = IMAGENET_MEAN,
        std: float | Sequence[float] = IMAGENET_STD,
        augment: bool = True,
        val_fraction: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, val_fraction=val_fraction, **kwargs)
        self.root = str(root)
        mean_, std_ = as_channel_stats(mean, "mean"), as_channel_stats(std, "std")
        self.train_transform = imagenet_transform(True, image_size, resize_size, mean_, std_, augment)
        self.eval_transform = imagenet_transform(False, image_size, resize_size, mean_, std_, augment)

    def _folder(self, split: str, classes: list[str]) -> ImageFolder:
        path = Path(self.root) / split
        try:
            return ImageFolder(str(path))
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"no images found under {path} (classes {classes[:5]}{'...' if len(classes) > 5 else ''}): "
                f"every class folder needs at least one file with extension {', '.join(IMG_EXTENSIONS)}; "
                f"expected layout {LAYOUT}. ({err})"
            ) from err

    def _check_layout(self) -> tuple[list[str], bool]:
        root = Path(self.root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder root {root} does not exist (data.root); expected {LAYOUT}")
        has_val = (root / "val").is_dir()
        for split in ("train", "test"):
            if not (root / split).is_dir():
                raise FileNotFoundError(f"{root / split} is missing; expected {LAYOUT}")
        classes = _class_dirs(root / "train")
        if not classes:
            raise FileNotFoundError(f"no class folders in {root / 'train'}; expected {LAYOUT}")
        for split in ("test", "val") if has_val else ("test",):
            other = _class_dirs(root / split)
            if other != classes:
                only_train = sorted(set(classes) - set(other))
                only_other = sorted(set(other) - set(classes))
                raise ValueError(
                    f"class folders of {root / 'train'} and {root / split} differ: "
                    f"only in train: {only_train}, only in {split}: {only_other}"
                )
        return classes, has_val

    def load_splits(self) -> Splits:
        classes, has_val = self._check_layout()
        base = self._folder("train", classes)
        targets = np.asarray(base.targets, dtype=np.int64)
        test_base = self._folder("test", classes)
        test = TransformedSubset(test_base, range(len(test_base)), self.eval_transform)  # type: ignore[arg-type]
        val: Dataset
        if has_val:
            val_base = self._folder("val", classes)
            val = TransformedSubset(val_base, range(len(val_base)), self.eval_transform)  # type: ignore[arg-type]
            train: Dataset = TransformedSubset(base, range(len(base)), self.train_transform)  # type: ignore[arg-type]
            train_targets = targets
        else:
            train, val, train_targets = carve_val(
                base, np.arange(len(targets)), targets, self.val_fraction, (self.split_seed, 1),
                self.train_transform, self.eval_transform,
            )  # fmt: skip
        return Splits(train, val, test, train_targets, list(base.classes))
