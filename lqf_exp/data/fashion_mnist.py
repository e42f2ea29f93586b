"""Fashion-MNIST class subsets (source: classes 0-4, target: 5-9) held as in-memory tensors."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lqf_exp.data.base import ClassificationDataModule, Splits, as_channel_stats
from lqf_exp.data.datasets import TensorImageDataset
from lqf_exp.data.sampling import cap_per_class, stratified_split

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def read_idx(path: str | Path) -> np.ndarray:
    """Read a gzip-compressed IDX file of unsigned bytes (the MNIST family's format)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (header {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {array.size} values")
    return array.reshape(shape)


@lru_cache(maxsize=4)
def _read_split(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = FILES[split]
    return read_idx(Path(folder) / images_file), read_idx(Path(folder) / labels_file)


def _find_folder(root: Path) -> Path | None:
    # torchvision's own download keeps the .gz files under FashionMNIST/raw.
    for folder in (root, root / "FashionMNIST" / "raw"):
        if all((folder / f).is_file() for pair in FILES.values() for f in pair):
            return folder
    return None


def load_fashion_mnist(root: str | Path, download: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images uint8 Nx28x28, labels), "test": (...)}`` from ``root``."""
    root = Path(root)
    folder = _find_folder(root)
    if folder is not None:
        return {split: _read_split(str(folder), split) for split in FILES}
    if download:
        from torchvision.datasets import FashionMNIST

        out = {}
        for split in FILES:
            ds = FashionMNIST(str(root), train=split == "train", download=True)
            out[split] = (ds.data.numpy(), ds.targets.numpy())
        return out
    expected = ", ".join(f for pair in FILES.values() for f in pair)
    raise FileNotFoundError(
        f"Fashion-MNIST not found at {root} (nor in {root / 'FashionMNIST' / 'raw'}): expected the files "
        f"{expected}. Install them with `apt-get install dataset-fashion-mnist` (into {DEFAULT_ROOT}), "
        f"or set data.download=true (and a writable data.root) to fetch them with torchvision."
    )


class FashionMNISTDataModule(ClassificationDataModule):
    """A subset of Fashion-MNIST's classes, re-indexed 0..C-1 in the order given.

    ``train_per_class`` caps the training images of each class (seeded by ``split_seed``) before
    ``val_fraction`` of them is carved out as val; test is the official test set restricted to
    ``classes``. 28x28 images are zero-padded (``resize="pad"``) or bilinearly resized to
    ``image_size``, and repeated to 3 channels.
    """

    def __init__(
        self,
        name: str = "fashion_mnist",
        root: str = DEFAULT_ROOT,
        classes: Sequence[int] = tuple(range(10)),
        train_per_class: int | None = None,
        image_size: int = 32,
        resize: str = "pad",
        mean: float | Sequence[float] = 0.2860,
        std: float | Sequence[float] = 0.3530,
        download: bool = False,
        val_fraction: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, val_fraction=val_fraction, **kwargs)
        self.classes = [int(c) for c in classes]
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be a non-empty list of distinct labels, got {self.classes}")
        if any(not 0 <= c <= 9 for c in self.classes):
            raise ValueError(f"Fashion-MNIST classes are 0..9, got {self.classes}")
        if train_per_class is not None and train_per_class < 1:
            raise ValueError(f"train_per_class must be >= 1 or null, got {train_per_class}")
        if resize not in ("pad", "bilinear"):
            raise ValueError(f"resize must be 'pad' or 'bilinear', got {resize!r}")
        if resize == "pad" and image_size < 28:
            raise ValueError(f"resize='pad' needs image_size >= 28, got {image_size}; use 'bilinear'")
        self.root = str(root)
        self.train_per_class = train_per_class
        self.image_size = int(image_size)
        self.resize = resize
        self.mean = as_channel_stats(mean, "mean")
        self.std = as_channel_stats(std, "std")
        self.download = bool(download)

    def _to_tensor(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).unsqueeze(1)
        size = self.image_size
        if size == x.shape[-1]:
            return x
        if self.resize == "pad":
            lo = (size - x.shape[-1]) // 2
            hi = size - x.shape[-1] - lo
            return F.pad(x, (lo, hi, lo, hi))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp_(0.0, 1.0)

    def _select(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the requested classes and their new labels 0..C-1."""
        remap = np.full(10, -1, dtype=np.int64)
        remap[self.classes] = np.arange(len(self.classes))
        idx = np.flatnonzero(remap[labels] >= 0)
        return idx, remap[labels[idx]]

    def load_splits(self) -> Splits:
        data = load_fashion_mnist(self.root, self.download)
        train_images, train_labels = data["train"]
        idx, targets = self._select(train_labels)
        if self.train_per_class is not None:
            keep = cap_per_class(targets, self.train_per_class, seed=(self.split_seed, 0))
            idx, targets = idx[keep], targets[keep]
        train_pos, val_pos = stratified_split(targets, self.val_fraction, seed=(self.split_seed, 1))
        test_images, test_labels = data["test"]
        test_idx, test_targets = self._select(test_labels)

        def part(images: np.ndarray, source: np.ndarray, labels: np.ndarray) -> TensorImageDataset:
            x = self._to_tensor(images[source])
            return TensorImageDataset(x, torch.from_numpy(labels), self.mean, self.std, source_index=source)

        return Splits(
            train=part(train_images, idx[train_pos], targets[train_pos]),
            val=part(train_images, idx[val_pos], targets[val_pos]),
            test=part(test_images, test_idx, test_targets),
            train_targets=targets[train_pos],
            class_names=[CLASS_NAMES[c] for c in self.classes],
        )
