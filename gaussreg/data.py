"""Datasets as whole in-memory tensors: images float in [0,1] (N,C,H,W), labels int64.

Reads the standard on-disk formats directly (IDX for the MNIST family, the python
pickle batches for CIFAR) from the folder layout torchvision uses under a data root,
plus the Debian package `dataset-fashion-mnist`. No torchvision needed to read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that load data: the dataset registry below is
# read by specs, manifests and the store tools, which must start without torch.

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


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


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

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


# ---------------------------------------------------------------- formats

def read_idx(path: os.PathLike) -> torch.Tensor:
    """One IDX file (optionally .gz) as a uint8 tensor of its declared shape."""
    import torch
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
    import torch
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
    import torch
    parts = [read_cifar_batch(folder / f) for f in files]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def synthetic(split: str, seed: int = 0, n: Optional[int] = None):
    """A small 10-class image set: one smooth random prototype per class plus noise.

    Learnable in a few epochs by every model here, and deterministic by seed (the
    train and test splits share prototypes and differ in their noise)."""
    import torch
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
    import torch
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def stratified(indices, labels, k: int):
    """k of `indices`, with each class in proportion to its share of `indices` (largest
    remainder), the first ones of each class in the given (seeded, random) order, which
    is kept. Balanced pools give balanced subsets: 100 per class for 1,000 of MNIST."""
    import torch
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
         device="cpu", test_only: bool = False) -> Splits:
    """Load once, split, subset, and move to `device` as float32 in [0,1].

    The validation split is 10% of the official training set chosen by split_seed
    (fixed, so runs of one dataset are comparable). `train_subset` keeps that many of
    the remaining training images (and a validation set of proportionate size),
    `test_subset` that many test images, all stratified by class (`stratified`) from a
    permutation seeded by split_seed. test_only leaves the training and validation
    splits empty (evaluating a model on a GPU needs only the test images there)."""
    import torch
    tx, ty = load_raw(name, "test", data_dir)
    if test_only:
        x, y = tx[:0], ty[:0]
    else:
        x, y = load_raw(name, "train", data_dir)
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
        return (t_x.to(device).float().div_(255.0), t_y.to(device))

    return Splits(info(name), *to(x[tr], y[tr]), *to(x[va], y[va]), *to(tx, ty))


# ---------------------------------------------------------------- listing & download

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


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path, md5: str, log: Callable) -> None:
    log(f"downloading {url}")
    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
        shutil.copyfileobj(r, f)
    got = _md5(tmp)
    if got != md5:
        tmp.unlink()
        raise DataError(f"checksum mismatch for {url}: got md5 {got}, expected {md5}; nothing was kept")
    os.replace(tmp, dest)


def _apt_install_fashion_mnist(log: Callable) -> bool:
    """The Debian package is the offline source; use it where we are allowed to."""
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return False
    for cmd in (["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"],
                ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"]):
        log("running " + " ".join(cmd))
        ok = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
        if cmd[1] == "install" and ok:
            return True
    return False


def download(name: str, data_dir=None, log: Callable = print) -> Path:
    """Make the dataset available: Debian package, then torchvision, then a plain
    HTTP fetch of the official files with an md5 check. Returns where it is."""
    ds = info(name)
    if name == "synthetic":
        raise DataError("'synthetic' is generated on the fly; there is nothing to download")
    found = find(name, data_dir)
    if found:
        log(f"{name} is already available in {found}")
        return found
    if name == "fashion-mnist" and _apt_install_fashion_mnist(log) and find(name, data_dir):
        return find(name, data_dir)
    root = data_root(data_dir)
    try:
        import torchvision.datasets as tvd  # optional extra `vision`
    except Exception:
        tvd = None
    try:
        if tvd is not None:
            cls = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}[name]
            log(f"downloading {name} with torchvision into {root}")
            getattr(tvd, cls)(str(root), train=True, download=True)
        else:
            folder = root / ds.folder if name in ("mnist", "fashion-mnist") else root
            folder.mkdir(parents=True, exist_ok=True)
            for fname, md5 in ds.files:
                dest = folder / fname
                if not (dest.is_file() and _md5(dest) == md5):
                    _fetch(ds.url + fname, dest, md5, log)
                if fname.endswith(".tar.gz"):
                    with tarfile.open(dest) as tar:
                        tar.extractall(root, filter="data")
    except DataError:
        raise
    except Exception as e:  # network down, DNS, HTTP errors: say so in one paragraph
        raise DataError(f"Could not download {name!r} ({type(e).__name__}: {e}). "
                        + missing_message(name, data_dir, downloading=True)) from None
    found = find(name, data_dir)
    if not found:
        raise DataError(missing_message(name, data_dir, downloading=True))
    return found


def encode_idx(arr: torch.Tensor) -> bytes:
    """Encode a uint8 tensor as an IDX file (for tests and for exporting subsets)."""
    buf = io.BytesIO()
    buf.write(bytes([0, 0, 0x08, arr.ndim]))
    for d in arr.shape:
        buf.write(int(d).to_bytes(4, "big"))
    buf.write(arr.contiguous().numpy().tobytes())
    return buf.getvalue()
