"""Getting a built-in dataset onto this machine (`gaussreg data download`): the Debian
package, torchvision, or the official files over HTTP with an md5 check."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import urllib.request
from pathlib import Path
from typing import Callable

from gaussreg.data.datasets import DataError, data_root, info
from gaussreg.data.loading import find, missing_message


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path, md5: str, log: Callable) -> None:
    log(f"downloading {url}")
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
        got = _md5(tmp)
        if got != md5:
            raise DataError(f"checksum mismatch for {url}: got md5 {got}, expected {md5}; nothing was kept")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a dropped connection or a full disk leaves no partial file
        raise


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
        return found  # the caller says where it is, once
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
