"""ImageNet-style transforms for file-backed data sets, and a subset that applies its own transform."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from lqf_exp.data.sampling import Seed, stratified_split

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb(image: Image.Image) -> Image.Image:
    """Some sets (Caltech-256, X-rays) hold grayscale or CMYK files; models read 3 channels."""
    return image if image.mode == "RGB" else image.convert("RGB")


def imagenet_transform(
    train: bool,
    image_size: int = 224,
    resize_size: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    augment: bool = True,
) -> Callable[[Image.Image], Any]:
    """Train: RandomResizedCrop + flip. Eval (or ``augment=False``): Resize + CenterCrop."""
    if train and augment:
        steps: list[Any] = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(resize_size), T.CenterCrop(image_size)]
    return T.Compose([T.Lambda(to_rgb), *steps, T.ToTensor(), T.Normalize(list(mean), list(std))])


class TransformedSubset(Dataset):
    """``base[indices]`` with ``transform`` applied to the image.

    The base data set is built once without a transform, so a train pool can feed both an
    augmented train split and a non-augmented val split without being scanned twice.
    """

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable[[Any], Any] | None) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.base[self.indices[index]]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(label)


def carve_val(
    base: Dataset,
    pool: np.ndarray,
    targets: np.ndarray,
    val_fraction: float,
    seed: Seed,
    train_transform: Callable[[Any], Any],
    eval_transform: Callable[[Any], Any],
) -> tuple[TransformedSubset, TransformedSubset, np.ndarray]:
    """Split ``base[pool]`` (labels ``targets[pool]``) into augmented train and plain val subsets.

    Returns (train, val, train labels in the order of ``train``).
    """
    kept, held = stratified_split(targets[pool], val_fraction, seed=seed)
    train_idx, val_idx = pool[kept], pool[held]
    return (
        TransformedSubset(base, train_idx.tolist(), train_transform),
        TransformedSubset(base, val_idx.tolist(), eval_transform),
        targets[train_idx],
    )
