"""Datasets as whole in-memory tensors: images float in [0,1] (N,C,H,W), labels int64.

Reads the standard on-disk formats directly (IDX for the MNIST family, the python
pickle batches for CIFAR) from the folder layout torchvision uses under a data root,
plus the Debian package `dataset-fashion-mnist`, and a user's files or loader. No
torchvision needed to read. What datasets there are is gaussreg.data.datasets.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from gaussreg.core import plugins
from gaussreg.data.datasets import (DATASETS, SYNTHETIC_SIZES, DataError, DatasetInfo, data_root, info, is_builtin,
                                    source_path)

if TYPE_CHECKING:
    import torch  # here: finding and listing datasets needs no torch

# torch is imported inside the functions: `gaussreg data list` and the dry-run's data check
# import this module without loading any tensors.

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ---------------------------------------------------------------- formats

def read_idx(path: os.PathLike) -> torch.Tensor:
    """One IDX file (optionally .gz) as a uint8 tensor of its declared shape."""
    import torch  # here: finding and listing datasets needs no torch
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX element type 0x{raw[2]:02x} is not unsigned byte")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    count = 1
    for d in dims:
        count *= d
    if len(raw) - header != count:
        raise DataError(f"{path}: IDX header declares {dims} ({count} bytes) "
                        f"but the file holds {len(raw) - header}")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)


class _BatchUnpickler(pickle.Unpickler):
    """Only what CIFAR batches hold (dicts, lists, numpy arrays): a data file must
    never be able to run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"),
                ("_codecs", "encode")}  # how protocol-2 pickles written by Python 3 hold bytes

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def read_cifar_batch(path: os.PathLike):
    """One CIFAR python pickle batch -> (uint8 N,3,32,32, int64 labels)."""
    import torch  # here: finding and listing datasets needs no torch
    path = Path(path)
    try:
        with open(path, "rb") as f:
            d = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path} is not a CIFAR pickle batch ({e})") from None
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    labels = d.get("labels", d.get("fine_labels"))
    if "data" not in d or labels is None:
        raise DataError(f"{path} is not a CIFAR pickle batch (no data/labels)")
    x = torch.as_tensor(d["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32)
    y = torch.as_tensor(list(labels), dtype=torch.int64)
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
    return x, y


# ---------------------------------------------------------------- locating

def _idx_file(folder: Path, stem: str) -> Optional[Path]:
    for p in (folder / stem, folder / (stem + ".gz")):
        if p.is_file():
            return p
    return None


def candidates(name: str, data_dir=None) -> list:
    """Folders searched for a dataset, in order."""
    ds = info(name)
    out = [data_root(data_dir) / ds.folder]
    if name == "fashion-mnist":
        out.append(DEBIAN_FASHION_MNIST)
    return out


def find(name: str, data_dir=None) -> Optional[Path]:
    """The folder that holds a complete copy of the dataset, or None."""
    if name == "synthetic":
        return None
    ds = info(name)
    for folder in candidates(name, data_dir):
        if ds.name in ("mnist", "fashion-mnist"):
            if all(_idx_file(folder, s) for s in _IDX_FILES):
                return folder
        elif name == "cifar10":
            if all((folder / f).is_file() for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
                return folder
        elif (folder / "train").is_file() and (folder / "test").is_file():
            return folder
    return None


def missing_message(name: str, data_dir=None, downloading: bool = False) -> str:
    """How to get a dataset that is not there; `downloading`: said after a download failed,
    so it does not send the user back to the command that just failed."""
    ds = info(name)
    where = " and ".join(str(p) for p in candidates(name, data_dir))
    ways = [f"run `gaussreg data download {name}` (needs internet access to the dataset's site)"
            if not downloading else "run it again where the dataset's site can be reached"]
    if name == "fashion-mnist":
        ways.insert(0, "on Debian/Ubuntu install the package: `apt-get install dataset-fashion-mnist`")
    files = ", ".join(f for f, _ in ds.files)
    ways.append(f"or copy the official files ({files}{', extracted' if name.startswith('cifar') else ''}) "
                f"into {data_root(data_dir) / ds.folder if not name.startswith('cifar') else data_root(data_dir)}")
    ways.append("or point --data-dir or $GAUSSREG_DATA at a folder laid out as torchvision lays it out")
    return f"Dataset {name!r} was not found (looked in {where}). To get it: " + "; ".join(ways) + "."


def load_raw(name: str, split: str, data_dir=None, seed: int = 0):
    """(uint8 images N,C,H,W, int64 labels) of the official 'train' or 'test' split."""
    if split not in ("train", "test"):
        raise ValueError(split)
    if name == "synthetic":
        return synthetic(split, seed=seed)
    folder = find(name, data_dir)
    if folder is None:
        raise DataError(missing_message(name, data_dir))
    if name in ("mnist", "fashion-mnist"):
        prefix = "train" if split == "train" else "t10k"
        x = read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte")).long()
        if x.ndim != 3 or len(x) != len(y):
            raise DataError(f"{folder}: {split} images {tuple(x.shape)} do not match labels {tuple(y.shape)}")
        return x.unsqueeze(1), y
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        files = [split]
    import torch  # here: finding and listing datasets needs no torch
    parts = [read_cifar_batch(folder / f) for f in files]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def synthetic(split: str, seed: int = 0, n: Optional[int] = None):
    """A small 10-class image set: one smooth random prototype per class plus noise.

    Learnable in a few epochs by every model here, and deterministic by seed (the
    train and test splits share prototypes and differ in their noise)."""
    import torch  # here: finding and listing datasets needs no torch
    ds = DATASETS["synthetic"]
    n = n or SYNTHETIC_SIZES[split]
    g = torch.Generator().manual_seed(seed)
    c, h, w = ds.shape
    protos = torch.rand(ds.classes, c, 7, 7, generator=g)
    protos = torch.nn.functional.interpolate(protos, size=(h, w), mode="bilinear", align_corners=False)
    g.manual_seed(seed * 2 + (1 if split == "train" else 2))
    y = torch.randint(0, ds.classes, (n,), generator=g)
    x = protos[y] * (0.6 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)) + 0.2 * torch.randn(n, c, h, w, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


# ---------------------------------------------------------------- splits

@dataclass
class Splits:
    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def sizes(self) -> dict:
        return {"train": len(self.train_y), "val": len(self.val_y), "test": len(self.test_y)}


def split_indices(n: int, val_fraction: float = 0.1, split_seed: int = 0):
    """(train, val) indices: the same for every run of a dataset with the same split_seed."""
    import torch  # here: finding and listing datasets needs no torch
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def stratified(indices, labels, k: int):
    """k of `indices`, with each class in proportion to its share of `indices` (largest
    remainder), the first ones of each class in the given (seeded, random) order, which
    is kept. Balanced pools give balanced subsets: 100 per class for 1,000 of MNIST."""
    import torch  # here: finding and listing datasets needs no torch
    if k >= len(indices):
        return indices
    y = labels[indices]
    classes, counts = torch.unique(y, return_counts=True)
    exact = counts.double() * k / len(indices)
    quota = exact.floor().long()
    # the remaining images go to the classes with the largest remainders (ties: lower class)
    order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - quota[i]).item(), i))
    for i in order[:k - int(quota.sum())]:
        quota[i] += 1
    keep = torch.zeros(len(indices), dtype=torch.bool)
    for c, q in zip(classes.tolist(), quota.tolist()):
        keep[torch.nonzero(y == c).flatten()[:q]] = True
    return indices[keep]


def load(name: str, data_dir=None, *, split_seed: int = 0, val_fraction: float = 0.1,
         train_subset: Optional[int] = None, test_subset: Optional[int] = None,
         device="cpu", test_only: bool = False, args: Optional[dict] = None, python_path=()) -> Splits:
    """Load once, split, subset, and move to `device` as float32 in [0,1].

    `name` is a built-in dataset or a user's source (`folder:`, `npz:`, a loader's import
    path or entry-point name, with `args`; see load_custom). The validation split is 10%
    of the official training set chosen by split_seed (fixed, so runs of one dataset are
    comparable). `train_subset` keeps that many of the remaining training images (and a
    validation set of proportionate size), `test_subset` that many test images, all
    stratified by class (`stratified`) from a permutation seeded by split_seed. test_only
    leaves the training and validation splits empty (evaluating a model on a GPU needs
    only the test images there; a user's loader is still called whole)."""
    import torch  # here: finding and listing datasets needs no torch
    if is_builtin(name):
        tx, ty = load_raw(name, "test", data_dir)
        x, y = (tx[:0], ty[:0]) if test_only else load_raw(name, "train", data_dir)
        ds = info(name)
    else:
        x, y, tx, ty, ds = load_custom(name, args or {}, python_path)
        if test_only:
            x, y = x[:0], y[:0]
    tr, va = split_indices(len(y), val_fraction, split_seed)
    if train_subset:
        tr = stratified(tr, y, train_subset)
        # keep the validation set proportionate to the subset so it stays cheap
        va = stratified(va, y, max(1, int(round(train_subset * val_fraction / (1 - val_fraction)))))
    if test_subset and test_subset < len(ty):
        keep = stratified(torch.randperm(len(ty), generator=torch.Generator().manual_seed(split_seed + 1)),
                          ty, test_subset)
        tx, ty = tx[keep], ty[keep]

    def to(t_x, t_y):
        t_x = t_x.to(device)
        return (t_x.float().div_(255.0) if t_x.dtype == torch.uint8 else t_x.float(), t_y.to(device))

    return Splits(ds, *to(x[tr], y[tr]), *to(x[va], y[va]), *to(tx, ty))


# ---------------------------------------------------------------- a user's data

FOLDER_ARGS = {"size", "channels", "test_fraction"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")
MIN_TRAIN = 6  # the fewest training images whose validation tenth (rounded) is not empty


def _tensor(v, what: str, where: str):
    import torch  # here: finding and listing datasets needs no torch
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    try:
        import numpy as np  # here: numpy only unpickles CIFAR and reads npz files
        return torch.from_numpy(np.ascontiguousarray(v))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{where}: {what} is not an array ({type(v).__name__}: {e})") from None


def _class_count(classes, where: str) -> int:
    """`classes` of a user's dataset: the number of classes (an int, or a 0-d integer array
    as np.savez stores one); class names are not taken (labels are integers)."""
    import numpy as np  # here: numpy only unpickles CIFAR and reads npz files
    value = np.asarray(classes)
    if value.ndim != 0 or not np.issubdtype(value.dtype, np.integer) or int(value) < 1:
        shown = repr(classes if value.ndim == 0 else value.tolist())
        raise DataError(f"{where}: classes must be the number of classes (an integer >= 1), not "
                        f"{shown if len(shown) <= 60 else shown[:57] + '...'}")
    return int(value)


def check_arrays(parts: dict, where: str, classes=None, mean=None, std=None):
    """(x_train, y_train, x_test, y_test, DatasetInfo) from a user's arrays, checked:
    images N x C x H x W (N x H x W taken as one channel), uint8 or float in [0, 1];
    integer labels in [0, classes); mean/std per channel from the training images when
    not given."""
    import torch  # here: finding and listing datasets needs no torch
    missing = [k for k in SPLIT_KEYS if k not in parts]
    if missing:
        raise DataError(f"{where} has no {', '.join(missing)} (it needs {', '.join(SPLIT_KEYS)})")
    x, y, tx, ty = (_tensor(parts[k], k, where) for k in SPLIT_KEYS)
    for k, t in (("x_train", x), ("x_test", tx)):
        if t.ndim not in (3, 4):
            raise DataError(f"{where}: {k} has shape {tuple(t.shape)}; images must be N x C x H x W "
                            "(or N x H x W for one channel)")
        if t.dtype != torch.uint8 and not t.is_floating_point():
            raise DataError(f"{where}: {k} is {t.dtype}; images must be uint8 (0-255) or float in [0, 1]")
        if t.is_floating_point() and len(t) and not (t.min() >= 0 and t.max() <= 1):
            raise DataError(f"{where}: {k} holds values from {float(t.min()):g} to {float(t.max()):g}; "
                            "float images must be in [0, 1] (noise is given in [0, 1] pixel units)")
    x, tx = (t.unsqueeze(1) if t.ndim == 3 else t for t in (x, tx))
    if x.shape[1:] != tx.shape[1:]:
        raise DataError(f"{where}: training images are {tuple(x.shape[1:])} but test images {tuple(tx.shape[1:])}")
    for k, t, imgs in (("y_train", y, x), ("y_test", ty, tx)):
        if t.ndim != 1 or len(t) != len(imgs) or t.is_floating_point() or t.dtype == torch.bool:
            raise DataError(f"{where}: {k} must be {len(imgs)} integer labels (one per image), "
                            f"not {t.dtype} of shape {tuple(t.shape)}")
    if len(y) < MIN_TRAIN or len(ty) < 1:
        raise DataError(f"{where}: needs at least {MIN_TRAIN} training images (a tenth of them, rounded, are the "
                        f"validation set) and 1 test image (has {len(y)} and {len(ty)})")
    y, ty = y.long(), ty.long()
    n_classes = _class_count(classes, where) if classes is not None else int(max(y.max(), ty.max())) + 1
    if min(y.min(), ty.min()) < 0 or max(y.max(), ty.max()) >= n_classes:
        raise DataError(f"{where}: labels must be in [0, {n_classes}) (found {int(min(y.min(), ty.min()))} "
                        f"to {int(max(y.max(), ty.max()))})")
    if mean is None or std is None:
        xf = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        mean = xf.mean(dim=(0, 2, 3)).tolist() if mean is None else mean
        std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist() if std is None else std
    try:
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise DataError(f"{where}: mean and std must be lists of numbers, one per channel ({x.shape[1]})") from None
    if len(mean) != x.shape[1] or len(std) != x.shape[1] or not all(math.isfinite(v) for v in mean + std) \
            or min(std) <= 0:
        raise DataError(f"{where}: mean and std need one finite value per channel ({x.shape[1]}), std > 0 "
                        f"(got mean {list(mean)}, std {list(std)})")
    return x, y, tx, ty, DatasetInfo(where, tuple(x.shape[1:]), n_classes, mean, std)


def _check_npz_members(path: Path) -> None:
    """DataError unless `path` is a zip archive of .npy arrays each holding the bytes its
    header declares: a truncated, empty or bogus file, a lone .npy, or a header claiming
    an array of terabytes is one sentence, before any array is allocated."""
    import zipfile

    import numpy as np  # here: numpy only unpickles CIFAR and reads npz files
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise DataError(f"{path} is a .npy file (one array); npz: needs a .npz archive of "
                        f"{', '.join(SPLIT_KEYS)} (numpy.savez)")
    try:
        with zipfile.ZipFile(path) as z:
            for member in z.infolist():
                with z.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if declared > member.file_size:
                    raise DataError(f"{path}: {member.filename} declares an array of shape {tuple(shape)} "
                                    f"({declared:,} bytes) but holds {member.file_size:,} bytes")
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        raise DataError(f"{path} is not a readable .npz file ({type(e).__name__}: {e or 'it ends early'})") from None


def load_npz(path: Path):
    import zipfile

    import numpy as np  # here: numpy only unpickles CIFAR and reads npz files
    _check_npz_members(path)
    try:
        with np.load(path, allow_pickle=False) as f:  # no pickles: a data file never runs code
            parts = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, MemoryError) as e:
        raise DataError(f"{path} is not a readable .npz file ({type(e).__name__}: {e})") from None
    return check_arrays(parts, str(path), classes=parts.get("classes"))


def _read_images(files, size, channels: int, where: str):
    try:
        from PIL import Image  # here: Pillow only reads a folder of images
    except ImportError:
        raise DataError(f"reading the images of {where} needs Pillow (pip install pillow)") from None
    import torch  # here: finding and listing datasets needs no torch
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                if size is not None:
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
                out.append(t.view(im.size[1], im.size[0], channels).permute(2, 0, 1))
        except OSError as e:
            raise DataError(f"{f} is not a readable image ({e})") from None
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise DataError(f"the images of {where} have different sizes ({', '.join(map(str, sorted(shapes)[:3]))}); "
                        "give dataset_args = { size = 32 } (or [[height, width]]) to resize them")
    return torch.stack(out) if out else torch.zeros(0, channels, 1, 1, dtype=torch.uint8)


def _image_folder(root: Path):
    """[(file, class index)], classes: torchvision's ImageFolder layout, classes sorted."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
             if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
    return items, classes


def load_folder(root: Path, args: dict):
    """ImageFolder layout: root/<class>/<image>, or root/train/<class>/... and
    root/test/<class>/... (else a stratified `test_fraction`, default 0.2, is held out
    as the test split, the same every time)."""
    import torch  # here: finding and listing datasets needs no torch
    for key in args:
        if key not in FOLDER_ARGS:
            raise DataError(f"unknown dataset_args key {key!r} for a folder dataset (known: "
                            f"{', '.join(sorted(FOLDER_ARGS))})")
    size = args.get("size")
    if size is not None:
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        if not (isinstance(size, (list, tuple)) and len(size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
            raise DataError(f"dataset_args.size must be a positive integer or [[height, width]], not {size!r}")
    channels = args.get("channels", 3)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise DataError(f"dataset_args.channels must be 1 (grayscale) or 3 (RGB), not {channels!r}")
    frac = args.get("test_fraction", 0.2)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
        raise DataError(f"dataset_args.test_fraction must be in (0, 1), not {frac!r}")
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, classes = _image_folder(root / "train")
        test, test_classes = _image_folder(root / "test")
        if test_classes != classes:
            raise DataError(f"{root}: the class folders of train ({', '.join(classes)}) and test "
                            f"({', '.join(test_classes)}) differ")
    else:
        items, classes = _image_folder(root)
        labels = torch.tensor([c for _, c in items], dtype=torch.int64)
        perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))
        n_test = max(1, int(round(len(items) * frac))) if len(items) > 1 else 0
        keep_test = set(stratified(perm, labels, n_test).tolist()) if n_test else set()
        train = [it for i, it in enumerate(items) if i not in keep_test]
        test = [it for i, it in enumerate(items) if i in keep_test]
    if not classes or not train or not test:
        raise DataError(f"{root} holds no images in the ImageFolder layout (root/<class>/<image>.png, or "
                        "root/train/<class>/... and root/test/<class>/...)")
    x = _read_images([f for f, _ in train], size, channels, str(root))
    tx = _read_images([f for f, _ in test], size, channels, str(root))
    parts = {"x_train": x, "y_train": torch.tensor([c for _, c in train]),
             "x_test": tx, "y_test": torch.tensor([c for _, c in test])}
    return check_arrays(parts, str(root), classes=len(classes))


def load_custom(name: str, args: dict, python_path=()):
    """(x_train, y_train, x_test, y_test, DatasetInfo) of a user's dataset: `folder:ROOT`,
    `npz:FILE` or a loader (import path or entry-point name in gaussreg.data.datasets) called
    with `args`, returning a dict with x_train, y_train, x_test, y_test and optionally
    classes, mean and std."""
    path = source_path(name)
    if name.startswith("npz:"):
        if args:
            raise DataError(f"a .npz dataset takes no dataset_args (got {', '.join(args)})")
        if not path.is_file():
            raise DataError(f"dataset file {path} does not exist")
        out = load_npz(path)
    elif name.startswith("folder:"):
        out = load_folder(path, args)
    else:
        try:
            loader = plugins.load("dataset", name, python_path)
        except plugins.PluginError as e:
            raise DataError(str(e)) from None
        try:
            got = loader(**args)
        except Exception as e:  # noqa: BLE001 - the user's code: name the loader and its last line
            last = f"{type(e).__name__}: {e}".strip().splitlines()[-1]
            raise DataError(f"dataset loader {name!r} raised {last}") from e
        if not isinstance(got, dict):
            raise DataError(f"dataset loader {name!r} returned a {type(got).__name__}, not a dict with "
                            f"{', '.join(SPLIT_KEYS)} (and optionally classes, mean, std)")
        out = check_arrays(got, f"dataset loader {name!r}", got.get("classes"), got.get("mean"), got.get("std"))
    x, y, tx, ty, ds = out
    return x, y, tx, ty, DatasetInfo(name, ds.shape, ds.classes, ds.mean, ds.std)


# ---------------------------------------------------------------- listing

def describe(name: str, data_dir=None) -> dict:
    """Where a dataset is and how big, for `gaussreg data list`."""
    ds = info(name)
    row = {"name": name, "shape": "x".join(map(str, ds.shape)), "classes": ds.classes}
    if name == "synthetic":
        return {**row, "found": True, "where": "generated",
                "train": SYNTHETIC_SIZES["train"], "test": SYNTHETIC_SIZES["test"], "note": ""}
    folder = find(name, data_dir)
    if folder is None:
        return {**row, "found": False, "where": "", "train": None, "test": None,
                "note": missing_message(name, data_dir)}
    try:
        if name in ("mnist", "fashion-mnist"):  # the label files say it; no need to decode the images
            n_train = len(read_idx(_idx_file(folder, "train-labels-idx1-ubyte")))
            n_test = len(read_idx(_idx_file(folder, "t10k-labels-idx1-ubyte")))
        else:
            n_train = len(load_raw(name, "train", data_dir)[1])
            n_test = len(load_raw(name, "test", data_dir)[1])
    except DataError as e:
        return {**row, "found": False, "where": str(folder), "train": None, "test": None, "note": str(e)}
    return {**row, "found": True, "where": str(folder), "train": n_train, "test": n_test, "note": ""}


def encode_idx(arr: torch.Tensor) -> bytes:
    """Encode a uint8 tensor as an IDX file (for tests and for exporting subsets)."""
    buf = io.BytesIO()
    buf.write(bytes([0, 0, 0x08, arr.ndim]))
    for d in arr.shape:
        buf.write(int(d).to_bytes(4, "big"))
    buf.write(arr.contiguous().numpy().tobytes())
    return buf.getvalue()
