"""Data modules: every one yields (float32 3xHxW normalized image, int64 label in 0..C-1)."""

from lqf_exp.data.base import ClassificationDataModule, Splits
from lqf_exp.data.datasets import TensorImageDataset
from lqf_exp.data.digits import DigitsDataModule
from lqf_exp.data.fashion_mnist import FashionMNISTDataModule, read_idx
from lqf_exp.data.imagefolder import ImageFolderDataModule
from lqf_exp.data.sampling import cap_per_class, k_shot_indices, stratified_split
from lqf_exp.data.torchvision_sets import SPECS as TORCHVISION_SPECS
from lqf_exp.data.torchvision_sets import TorchvisionDataModule

__all__ = [
    "TORCHVISION_SPECS",
    "ClassificationDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "Splits",
    "TensorImageDataset",
    "TorchvisionDataModule",
    "cap_per_class",
    "k_shot_indices",
    "read_idx",
    "stratified_split",
]
