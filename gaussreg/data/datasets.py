"""The built-in datasets (names, image shapes, classes, normalisation, where they come
from) and how a spec names a user's dataset. Torch-free: specs, manifests and models read
it; gaussreg.data.loading loads the tensors and gaussreg.data.download fetches the files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


class DataError(Exception):
    """A dataset cannot be found or read; the message says what to do."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    shape: tuple  # (C, H, W)
    classes: int
    mean: tuple  # per channel, in [0,1] pixel units: the model normalises, not the data
    std: tuple
    folder: str = ""  # torchvision's folder under the data root
    files: tuple = ()  # (file name, md5 of the official download)
    url: str = ""


DATASETS = {
    "mnist": DatasetInfo(
        "mnist", (1, 28, 28), 10, (0.1307,), (0.3081,), "MNIST/raw",
        (("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
         ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
         ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
         ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")),
        "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", (1, 28, 28), 10, (0.2860,), (0.3530,), "FashionMNIST/raw",
        (("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
         ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
         ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
         ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310")),
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
    "cifar10": DatasetInfo(
        "cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        "cifar-10-batches-py",
        (("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        "https://www.cs.toronto.edu/~kriz/"),
    "cifar100": DatasetInfo(
        "cifar100", (3, 32, 32), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        "cifar-100-python",
        (("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),),
        "https://www.cs.toronto.edu/~kriz/"),
    # Generated, deterministic by seed: for tests and smoke runs.
    "synthetic": DatasetInfo("synthetic", (1, 28, 28), 10, (0.5,), (0.25,)),
}

SYNTHETIC_SIZES = {"train": 2000, "test": 500}


def info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None


def data_root(data_dir: Optional[os.PathLike] = None) -> Path:
    """--data-dir, else $GAUSSREG_DATA, else ./data."""
    return Path(data_dir or os.environ.get("GAUSSREG_DATA") or "data")


SOURCES = ("folder:", "npz:")  # built-in readers of a user's files; the rest of the name is a path


def is_builtin(name: str) -> bool:
    return name in DATASETS


def source_path(name: str) -> Optional[Path]:
    """The path of a `folder:` or `npz:` dataset, else None."""
    for prefix in SOURCES:
        if name.startswith(prefix):
            return Path(name[len(prefix):])
    return None
