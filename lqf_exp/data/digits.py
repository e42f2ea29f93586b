"""scikit-learn's bundled 8x8 digits (1797 images, 10 classes), upsampled; needs no download."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lqf_exp.data.base import ClassificationDataModule, Splits, as_channel_stats
from lqf_exp.data.datasets import TensorImageDataset
from lqf_exp.data.sampling import stratified_split


class DigitsDataModule(ClassificationDataModule):
    """``sklearn.datasets.load_digits``, bilinearly upsampled to ``image_size``.

    Seeded stratified split: ``test_fraction`` of each class is test, then ``val_fraction`` of the
    rest is val. The whole set is preprocessed once into tensors.
    """

    def __init__(
        self,
        name: str = "digits",
        image_size: int = 32,
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.5,
        test_fraction: float = 0.2,
        val_fraction: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, val_fraction=val_fraction, **kwargs)
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 (digits are 8x8), got {image_size}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.image_size = int(image_size)
        self.mean = as_channel_stats(mean, "mean")
        self.std = as_channel_stats(std, "std")
        self.test_fraction = float(test_fraction)

    def load_splits(self) -> Splits:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        # Values count set pixels (0..16) in 4x4 blocks of 32x32 bitmaps, so /16 maps to [0, 1].
        raw = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
        images = F.interpolate(raw, size=self.image_size, mode="bilinear", align_corners=False)
        images = images.clamp_(0.0, 1.0)
        labels = torch.from_numpy(bunch.target.astype(np.int64))

        targets = bunch.target
        rest, test_idx = stratified_split(targets, self.test_fraction, seed=(self.split_seed, 0))
        train_pos, val_pos = stratified_split(targets[rest], self.val_fraction, seed=(self.split_seed, 1))
        train_idx, val_idx = rest[train_pos], rest[val_pos]

        def part(idx: np.ndarray) -> TensorImageDataset:
            t = torch.from_numpy(idx)
            return TensorImageDataset(images[t], labels[t], self.mean, self.std, source_index=idx)

        return Splits(
            train=part(train_idx),
            val=part(val_idx),
            test=part(test_idx),
            train_targets=bunch.target[train_idx],
            class_names=[str(c) for c in range(10)],
        )
