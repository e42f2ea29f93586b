"""Tests of lqf_exp.data: splits, k-shot sampling, loaders, error messages and the data configs."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.datasets
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import Dataset

from lqf_exp.data import (
    TORCHVISION_SPECS,
    ClassificationDataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    TorchvisionDataModule,
    k_shot_indices,
    read_idx,
    stratified_split,
)
from lqf_exp.data.base import kept_indices

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "data"
FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_ROOT / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed at {FMNIST_ROOT} (apt-get install dataset-fashion-mnist)",
)


def labels_of(ds: Dataset) -> np.ndarray:
    return np.asarray([ds[i][1] for i in range(len(ds))])  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule()
    dm.setup("fit")
    return dm


# -- sampling helpers -------------------------------------------------------------------------------------
def test_k_shot_exact_seeded_and_nested() -> None:
    targets = np.repeat(np.arange(4), [7, 9, 12, 30])
    idx = k_shot_indices(targets, 5, seed=1)
    assert np.bincount(targets[idx]).tolist() == [5, 5, 5, 5]
    assert len(set(idx.tolist())) == 20
    assert np.array_equal(idx, k_shot_indices(targets, 5, seed=1))
    assert not np.array_equal(idx, k_shot_indices(targets, 5, seed=2))
    # same seed: the smaller subset is contained in the larger one
    assert set(k_shot_indices(targets, 2, seed=1)) <= set(idx.tolist())


def test_k_shot_errors_name_value_and_class_size() -> None:
    targets = np.repeat(np.arange(3), [10, 4, 8])
    with pytest.raises(ValueError, match=r"shots=5.*class 1.*only 4"):
        k_shot_indices(targets, 5, seed=0)
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"shots={bad}|>= 1"):
            k_shot_indices(targets, bad, seed=0)
    # a class absent from the train split counts as size 0
    with pytest.raises(ValueError, match="only 0"):
        k_shot_indices(targets, 1, seed=0, num_classes=4)


def test_stratified_split_keeps_every_class() -> None:
    targets = np.repeat(np.arange(3), [2, 10, 25])
    kept, held = stratified_split(targets, 0.2, seed=0)
    assert not set(kept.tolist()) & set(held.tolist())
    assert len(kept) + len(held) == len(targets)
    assert np.bincount(targets[held]).tolist() == [1, 2, 5]


# -- digits -----------------------------------------------------------------------------------------------
def test_digits_items_and_splits(digits: DigitsDataModule) -> None:
    assert digits.num_classes == 10 and digits.class_names == [str(i) for i in range(10)]
    parts = [digits.train_dataset, digits.val_dataset, digits.test_dataset]
    sources = [set(p.source_index.tolist()) for p in parts]  # type: ignore[attr-defined]
    assert sum(len(s) for s in sources) == 1797
    assert set().union(*sources) == set(range(1797))
    assert len(parts[2]) == pytest.approx(0.2 * 1797, abs=10)  # type: ignore[arg-type]
    assert len(parts[1]) == pytest.approx(0.1 * 0.8 * 1797, abs=10)  # type: ignore[arg-type]

    x, y = digits.train_dataset[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    images = parts[0].images  # type: ignore[attr-defined]
    assert images.min() >= 0 and images.max() <= 1  # stored in [0, 1] before normalization
    assert x.min() == pytest.approx(-1.0)  # background: (0 - 0.5) / 0.5

    xb, yb = next(iter(digits.train_dataloader()))
    assert xb.shape == (64, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert yb.min() >= 0 and yb.max() <= 9
    info = digits.describe()
    assert info["name"] == "digits" and info["num_classes"] == 10 and info["shots"] is None
    assert info["train_size"] + info["val_size"] + info["test_size"] == 1797


def test_digits_split_seed_changes_split() -> None:
    a, b = DigitsDataModule(split_seed=0), DigitsDataModule(split_seed=1)
    a.setup(), b.setup()
    assert not np.array_equal(a.test_dataset.source_index, b.test_dataset.source_index)  # type: ignore[attr-defined]


def test_setup_is_idempotent_and_loader_seeded() -> None:
    dm = DigitsDataModule(shots=3, batch_size=8)
    dm.setup("fit")
    train = dm.train_dataset
    dm.setup("test")
    assert dm.train_dataset is train
    first = [next(iter(dm.train_dataloader()))[1] for _ in range(2)]
    assert torch.equal(first[0], first[1])


def test_k_shot_only_touches_train(digits: DigitsDataModule) -> None:
    def build(shots: int | None, seed: int) -> DigitsDataModule:
        dm = DigitsDataModule(shots=shots, shots_seed=seed)
        dm.setup()
        return dm

    a, b, c = build(5, 0), build(5, 0), build(5, 1)
    assert np.bincount(labels_of(a.train_dataset)).tolist() == [5] * 10
    assert a.train_dataset.indices == b.train_dataset.indices  # type: ignore[attr-defined]
    assert a.train_dataset.indices != c.train_dataset.indices  # type: ignore[attr-defined]
    full_train = digits.train_dataset.source_index  # type: ignore[attr-defined]
    assert np.array_equal(a.train_dataset.dataset.source_index, full_train)  # type: ignore[attr-defined]
    for dm in (a, c):
        for split in ("val_dataset", "test_dataset"):
            assert np.array_equal(getattr(dm, split).source_index, getattr(digits, split).source_index)
    assert a.describe()["train_size"] == 50


def test_shots_too_large_or_invalid(digits: DigitsDataModule) -> None:
    smallest = int(np.bincount(digits.train_dataset.labels.numpy()).min())  # type: ignore[attr-defined]
    dm = DigitsDataModule(shots=smallest + 1)
    with pytest.raises(ValueError, match=rf"shots={smallest + 1}.*only {smallest} training images"):
        dm.setup()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="shots"):
            DigitsDataModule(shots=bad)  # type: ignore[arg-type]


# -- Fashion-MNIST ----------------------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_on_generated_idx(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 200), ("t10k", 50)):
        labels = np.arange(n) % 10
        images = (labels[:, None, None] * 20 + rng.integers(0, 5, (n, 28, 28))).astype(np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    assert read_idx(tmp_path / "t10k-images-idx3-ubyte.gz").shape == (50, 28, 28)
    dm = FashionMNISTDataModule(root=str(tmp_path), classes=[7, 2], train_per_class=10, val_fraction=0.2)
    dm.setup()
    assert dm.class_names == ["Sneaker", "Pullover"]
    assert np.bincount(labels_of(dm.train_dataset)).tolist() == [8, 8]
    assert np.bincount(labels_of(dm.val_dataset)).tolist() == [2, 2]
    assert np.bincount(labels_of(dm.test_dataset)).tolist() == [5, 5]
    x, y = dm.test_dataset[0]
    assert x.shape == (3, 32, 32)
    # zero padding 28 -> 32 gives a normalized-zero border; the raw value encodes the original class
    assert torch.allclose(x[:, 0, :], torch.tensor(-0.2860 / 0.3530))
    raw = x[0, 2:30, 2:30] * 0.3530 + 0.2860
    assert int(round(float(raw.min()) * 255)) // 20 == [7, 2][y]


@needs_fmnist
def test_fashion_mnist_target_config_sizes() -> None:
    dm = FashionMNISTDataModule(classes=[5, 6, 7, 8, 9], train_per_class=100)
    dm.setup()
    assert dm.num_classes == 5 and dm.class_names[0] == "Sandal"
    train, val, test = labels_of(dm.train_dataset), labels_of(dm.val_dataset), labels_of(dm.test_dataset)
    assert (np.bincount(train) + np.bincount(val)).tolist() == [100] * 5
    assert np.bincount(test).tolist() == [1000] * 5
    raw_test = read_idx(FMNIST_ROOT / "t10k-labels-idx1-ubyte.gz")
    src = dm.test_dataset.source_index  # type: ignore[attr-defined]
    assert np.array_equal(raw_test[src], test + 5)  # re-indexed in the given order


@needs_fmnist
def test_fashion_mnist_source_all_images() -> None:
    dm = FashionMNISTDataModule(classes=[0, 1, 2, 3, 4], image_size=32)
    dm.setup()
    sizes = dm.describe()
    assert sizes["train_size"] + sizes["val_size"] == 30000 and sizes["test_size"] == 5000
    assert set(np.unique(dm.train_dataset.labels.numpy()).tolist()) == {0, 1, 2, 3, 4}  # type: ignore[attr-defined]


def test_fashion_mnist_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        FashionMNISTDataModule(root=str(missing), classes=[0, 1]).setup()
    msg = str(info.value)
    for part in (str(missing), "train-images-idx3-ubyte.gz", "dataset-fashion-mnist", "data.download=true"):
        assert part in msg
    with pytest.raises(ValueError, match="0..9"):
        FashionMNISTDataModule(classes=[3, 10])


# -- torchvision sets (fake datasets: nothing is downloaded) -----------------------------------------------
class FakeVision(Dataset):
    """Stands in for a torchvision data set: 3 classes, grayscale PIL images, split-dependent size."""

    per_class = {"train": 12, "val": 3, "test": 4, None: 12}

    def __init__(self, root: str, download: bool = False, **kwargs: Any) -> None:
        split = kwargs.get("split", {True: "train", False: "test"}.get(kwargs.get("train")))  # type: ignore[arg-type]
        self.split = "train" if split == "trainval" else split
        self.targets = np.repeat(np.arange(3), self.per_class[self.split]).tolist()
        self.classes = ["ant", "bee", "cat"]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.new("L", (40, 30), color=self.targets[i] * 50), self.targets[i]


def fake_module(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dataset: str, **kw: Any
) -> TorchvisionDataModule:
    spec = TORCHVISION_SPECS[dataset]
    monkeypatch.setattr(torchvision.datasets, spec.cls_name, FakeVision)
    (tmp_path / spec.folder).mkdir(parents=True)
    dm = TorchvisionDataModule(dataset=dataset, root=str(tmp_path), image_size=32, resize_size=36, **kw)
    dm.setup()
    return dm


def test_torchvision_carved_val(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    dm = fake_module(monkeypatch, tmp_path, "cifar10", val_fraction=0.25, shots=2)
    assert dm.class_names == ["ant", "bee", "cat"] and dm.name == "cifar10"
    assert np.bincount(labels_of(dm.val_dataset)).tolist() == [3, 3, 3]
    assert np.bincount(labels_of(dm.test_dataset)).tolist() == [4, 4, 4]
    assert np.bincount(labels_of(dm.train_dataset)).tolist() == [2, 2, 2]
    train_pool = set(dm._require().train.indices)  # type: ignore[attr-defined]
    assert not train_pool & set(dm.val_dataset.indices)  # type: ignore[attr-defined]
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (6, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64


def test_torchvision_official_val_and_caltech_split(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    dm = fake_module(monkeypatch, tmp_path / "f", "flowers102")
    assert [len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)] == [36, 9, 12]  # type: ignore[arg-type]
    dm = fake_module(
        monkeypatch, tmp_path / "c", "caltech256", train_per_class=8, test_per_class=3, val_fraction=0.25
    )
    assert np.bincount(labels_of(dm.train_dataset)).tolist() == [6, 6, 6]
    assert np.bincount(labels_of(dm.val_dataset)).tolist() == [2, 2, 2]
    assert np.bincount(labels_of(dm.test_dataset)).tolist() == [3, 3, 3]
    used = [dm.train_dataset.indices, dm.val_dataset.indices, dm.test_dataset.indices]  # type: ignore[attr-defined]
    assert len(set().union(*used)) == sum(len(u) for u in used)


@pytest.mark.parametrize("dataset", sorted(TORCHVISION_SPECS))
def test_torchvision_missing_root(tmp_path: Path, dataset: str) -> None:
    dm = TorchvisionDataModule(dataset=dataset, root=str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    msg = str(info.value)
    assert str(tmp_path / "absent" / TORCHVISION_SPECS[dataset].folder) in msg and "data.download=true" in msg
    assert not (tmp_path / "absent").exists()  # nothing created without download


def test_torchvision_wraps_runtime_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "OxfordIIITPet", broken)
    (tmp_path / "oxford-iiit-pet").mkdir()
    with pytest.raises(FileNotFoundError, match="oxford-iiit-pet.*corrupted"):
        TorchvisionDataModule(dataset="oxford_pets", root=str(tmp_path)).setup()
    with pytest.raises(ValueError, match="unknown torchvision data set"):
        TorchvisionDataModule(dataset="imagenet")


# -- image folders ----------------------------------------------------------------------------------------
def make_tree(root: Path, splits: dict[str, int], classes: tuple[str, ...] = ("cat", "dog", "owl")) -> None:
    for split, n in splits.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                mode = "L" if i % 2 else "RGB"  # grayscale files must come out with 3 channels too
                Image.new(mode, (20 + i, 24), color=40 * c if mode == "L" else (40 * c, 0, 0)).save(
                    folder / f"{i}.png"
                )


def test_imagefolder_tree(tmp_path: Path) -> None:
    make_tree(tmp_path, {"train": 6, "test": 2})
    dm = ImageFolderDataModule(
        root=str(tmp_path), image_size=16, resize_size=18, val_fraction=0.2, batch_size=4
    )
    dm.setup()
    assert dm.class_names == ["cat", "dog", "owl"] and dm.num_classes == 3
    assert np.bincount(labels_of(dm.train_dataset)).tolist() == [5, 5, 5]
    assert np.bincount(labels_of(dm.val_dataset)).tolist() == [1, 1, 1]
    assert np.bincount(labels_of(dm.test_dataset)).tolist() == [2, 2, 2]
    xb, yb = next(iter(dm.val_dataloader()))
    assert xb.shape == (3, 3, 16, 16) and yb.dtype == torch.int64

    make_tree(tmp_path / "v", {"train": 3, "val": 2, "test": 1})
    dm = ImageFolderDataModule(root=str(tmp_path / "v"), image_size=16, resize_size=18, shots=1)
    dm.setup()
    assert [len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)] == [3, 6, 3]  # type: ignore[arg-type]


def test_imagefolder_errors(tmp_path: Path) -> None:
    def fails(root: Path, exc: type[Exception], pattern: str) -> None:
        with pytest.raises(exc, match=pattern):
            ImageFolderDataModule(root=str(root)).setup()

    fails(tmp_path / "absent", FileNotFoundError, str(tmp_path / "absent"))
    (tmp_path / "a" / "test" / "cat").mkdir(parents=True)
    fails(tmp_path / "a", FileNotFoundError, str(tmp_path / "a" / "train"))
    make_tree(tmp_path / "b", {"train": 2})
    fails(tmp_path / "b", FileNotFoundError, str(tmp_path / "b" / "test"))
    make_tree(tmp_path / "c", {"train": 2})
    make_tree(tmp_path / "c", {"test": 2}, classes=("cat", "dog", "emu"))
    fails(tmp_path / "c", ValueError, r"only in train: \['owl'\], only in test: \['emu'\]")
    make_tree(tmp_path / "d", {"train": 0, "test": 1})
    fails(tmp_path / "d", FileNotFoundError, "no images found under " + str(tmp_path / "d" / "train"))


# -- configs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("yaml", sorted(p.name for p in CONF_DIR.glob("*.yaml")))
def test_data_config_instantiates(yaml: str, tmp_path: Path) -> None:
    data = OmegaConf.load(CONF_DIR / yaml)
    for key in ("_target_", "name", "batch_size", "num_workers", "shots", "shots_seed", "split_seed"):
        assert key in data, f"{yaml} lacks {key}"
    assert data.shots is None and data._target_.startswith("lqf_exp.data.")
    cfg = OmegaConf.create(
        {"seed": 7, "paths": {"root_dir": str(tmp_path), "data_dir": "${paths.root_dir}/data"}}
    )
    cfg.data = data
    if OmegaConf.is_missing(cfg.data, "root"):
        cfg.data.root = str(tmp_path)
    dm = instantiate(cfg.data)
    assert isinstance(dm, ClassificationDataModule)
    assert dm.name == data.name and dm.shots_seed == 7 and dm.split_seed == 0
    if isinstance(dm, TorchvisionDataModule):
        assert dm.root == str(tmp_path / "data")
    if yaml == "digits.yaml":
        dm.setup()
        assert dm.describe()["num_classes"] == 10


@pytest.mark.parametrize(("content", "message"), [("0\n3\n99\n", "outside the training set"), ("1\n1\n", "twice"),
                                                  ("a\n", "one integer index per line"),
                                                  ("0\n1\n2\n3\n4\n", "drops all 5")])
def test_drop_file_errors_name_the_problem(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "drop.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        kept_indices(path, 5)


def test_drop_file_leaves_out_exactly_its_indices(tmp_path: Path) -> None:
    (tmp_path / "drop.txt").write_text("4\n0\n")
    assert kept_indices(tmp_path / "drop.txt", 6) == [1, 2, 3, 5]
    dm = DigitsDataModule(drop=str(tmp_path / "drop.txt"), shots=1)
    dm.setup("fit")
    full = DigitsDataModule(shots=1)
    full.setup("fit")
    assert len(dm.train_dataset) == 8 and dm.describe()["dropped"] == "drop.txt"
    assert torch.equal(dm.train_dataset[0][0], full.train_dataset[1][0])
    with pytest.raises(FileNotFoundError, match="data.drop"):
        DigitsDataModule(drop=str(tmp_path / "missing.txt"))
