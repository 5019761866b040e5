import gzip
import pickle
import subprocess

import numpy as np
import pytest
import torch
from conftest import cli, python_env

from gaussreg.data import loading as data


def _write_idx(path, arr, gz=True):
    payload = data.encode_idx(arr)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_mnist(root, folder="MNIST/raw", n_train=200, n_test=50, gz=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = root / folder
    imgs = {"train": torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8),
            "t10k": torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8)}
    for split, x in imgs.items():
        _write_idx(d / f"{split}-images-idx3-ubyte", x, gz)
        _write_idx(d / f"{split}-labels-idx1-ubyte", (torch.arange(len(x)) % 10).to(torch.uint8), gz)
    return imgs


def _write_cifar_batch(path, n, key="labels", seed=0):
    rng = np.random.default_rng(seed)
    d = {b"batch_label": b"x", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         key.encode(): list(rng.integers(0, 10, n))}
    d[key.encode()] = [int(v) for v in d[key.encode()]]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)
    return d


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    imgs = make_mnist(tmp_path, gz=gz)
    x, y = data.load_raw("mnist", "train", tmp_path)
    assert x.shape == (200, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], imgs["train"])
    assert y.dtype == torch.int64 and y[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    tx, ty = data.load_raw("mnist", "test", tmp_path)
    assert torch.equal(tx[:, 0], imgs["t10k"]) and len(ty) == 50


def test_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(data.DataError, match="magic"):
        data.read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(data.encode_idx(torch.zeros(4, 2, 2, dtype=torch.uint8))[:-3])
    with pytest.raises(data.DataError, match="declares"):
        data.read_idx(short)


def test_cifar10_and_cifar100_batches(tmp_path):
    root = tmp_path
    batches = [_write_cifar_batch(root / "cifar-10-batches-py" / f"data_batch_{i}", 20, seed=i) for i in range(1, 6)]
    _write_cifar_batch(root / "cifar-10-batches-py" / "test_batch", 10, seed=9)
    x, y = data.load_raw("cifar10", "train", root)
    assert x.shape == (100, 3, 32, 32) and y.shape == (100,)
    # channel-major rows: the first 1024 bytes are the red plane
    assert torch.equal(x[0, 0].flatten(), torch.from_numpy(batches[0][b"data"][0, :1024]))
    assert y[:20].tolist() == batches[0][b"labels"]
    _write_cifar_batch(root / "cifar-100-python" / "train", 30, key="fine_labels")
    _write_cifar_batch(root / "cifar-100-python" / "test", 12, key="fine_labels")
    s = data.load("cifar100", root, split_seed=0)
    assert s.sizes() == {"train": 27, "val": 3, "test": 12}
    assert s.train_x.dtype == torch.float32 and 0 <= s.train_x.min() and s.train_x.max() <= 1


def test_cifar_loader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    p = tmp_path / "evil"
    p.write_bytes(pickle.dumps({b"data": Evil(), b"labels": [1]}))
    with pytest.raises(data.DataError, match="refusing"):
        data.read_cifar_batch(p)


def test_split_is_deterministic_and_ten_percent(tmp_path):
    make_mnist(tmp_path, n_train=300)
    a = data.load("mnist", tmp_path)
    b = data.load("mnist", tmp_path)
    c = data.load("mnist", tmp_path, split_seed=1)
    assert a.sizes() == {"train": 270, "val": 30, "test": 50}
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.val_x, c.val_x)
    tr, va = data.split_indices(300)
    assert len(set(tr.tolist()) | set(va.tolist())) == 300 and not set(tr.tolist()) & set(va.tolist())
    s = data.load("mnist", tmp_path, train_subset=90, test_subset=20)
    assert s.sizes() == {"train": 90, "val": 10, "test": 20}
    # a subset keeps the same split: every subset image is one of the full training set
    full = {bytes(v.flatten().mul(255).byte().tolist()) for v in a.train_x}
    assert all(bytes(v.flatten().mul(255).byte().tolist()) in full for v in s.train_x)
    # stratified: each class within one image of its share of the pool it is drawn from
    for ys, pool in ((s.train_y, a.train_y), (s.val_y, a.val_y), (s.test_y, a.test_y)):
        want = torch.bincount(pool, minlength=10).double() * len(ys) / len(pool)
        assert ((torch.bincount(ys, minlength=10) - want).abs() < 1).all()
    assert torch.bincount(s.test_y, minlength=10).tolist() == [2] * 10  # the test set is balanced


def test_stratified_keeps_class_shares_and_order():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    pool = torch.randperm(100, generator=torch.Generator().manual_seed(3))
    sub = data.stratified(pool, labels, 10)
    assert torch.bincount(labels[sub], minlength=3).tolist() == [6, 3, 1]
    pos = [pool.tolist().index(i) for i in sub.tolist()]
    assert pos == sorted(pos)  # in the permutation's order
    assert torch.bincount(labels[data.stratified(pool, labels, 7)], minlength=3).tolist() == [4, 2, 1]
    assert torch.equal(data.stratified(pool, labels, 100), pool)


def test_synthetic_is_deterministic_by_seed():
    a, b, c = data.synthetic("train", 0), data.synthetic("train", 0), data.synthetic("train", 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (2000, 1, 28, 28) and set(a[1].unique().tolist()) == set(range(10))


def test_missing_dataset_message_says_every_way(tmp_path, monkeypatch):
    monkeypatch.setenv("GAUSSREG_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(data.DataError) as e:
        data.load("mnist")
    msg = str(e.value)
    assert "gaussreg data download mnist" in msg and "--data-dir" in msg and "GAUSSREG_DATA" in msg
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in msg
    fm = data.missing_message("fashion-mnist", tmp_path)
    assert "apt-get install dataset-fashion-mnist" in fm


@pytest.mark.process  # `gaussreg data` as a process: the command itself, not its functions
def test_data_list_cli_reports_found_and_missing(tmp_path):
    make_mnist(tmp_path, n_train=40, n_test=10)
    out = subprocess.run(cli("data", "list", "--data-dir", tmp_path), capture_output=True, text=True,
                         env=python_env(COLUMNS="200"))
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("│ mnist"))
    assert "40" in line and "10" in line and str(tmp_path) in line
    assert "gaussreg data download cifar10" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.process  # `gaussreg data` as a process: the command itself, not its functions
def test_download_of_a_missing_dataset_fails_in_one_paragraph(tmp_path):
    # no network to the dataset sites here, or an unknown name: a sentence, exit != 0, no traceback
    out = subprocess.run(cli("data", "download", "nope", "--data-dir", tmp_path), capture_output=True, text=True,
                         env=python_env())
    assert out.returncode == 2 and "unknown dataset 'nope'" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.skipif(data.find("fashion-mnist") is None,
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    s = data.load("fashion-mnist")
    assert s.sizes() == {"train": 54000, "val": 6000, "test": 10000}
    assert s.train_x.shape[1:] == (1, 28, 28)
    assert 0.27 < s.train_x.mean().item() < 0.30  # the published mean 0.2860
    assert torch.bincount(s.test_y).tolist() == [1000] * 10
