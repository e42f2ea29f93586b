"""The in-memory datasets the data modules build: normalized image tensors, and a cast of another dataset's images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["CastImages", "TensorImageDataset"]


class TensorImageDataset(Dataset):
    """In-memory images in [0, 1], shape (N, 1|3, H, W); items are normalized 3-channel tensors.

    Grayscale images are stored once with one channel and repeated per item, which keeps
    e.g. Fashion-MNIST three times smaller in memory. ``source_index`` records where each item sits
    in the original data set, to trace samples (e.g. for influence scores) and check splits.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        source_index: np.ndarray | None = None,
    ) -> None:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (N, 1|3, H, W), got {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images.float().contiguous()
        self.labels = labels.long().contiguous()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.source_index = np.arange(len(labels)) if source_index is None else np.asarray(source_index)

    @property
    def targets(self) -> np.ndarray:
        return self.labels.numpy()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index].expand(3, -1, -1)
        return (image - self.mean) / self.std, int(self.labels[index])


class CastImages(Dataset):
    """``base``'s items with the image cast to ``dtype``."""

    def __init__(self, base: Dataset, dtype: torch.dtype) -> None:
        self.base, self.dtype = base, dtype

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Any]:
        image, label = self.base[index]
        return image.to(self.dtype), label
