"""A researcher's own model and data: a package in a temp dir, named by a manifest."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
import torch
from conftest import cli, gaussreg, python_env
from torch import nn

from gaussreg.core import plugins
from gaussreg.data import datasets
from gaussreg.data import loading as data
from gaussreg.runs import manifest
from gaussreg.science import models
from gaussreg.science.models import SplitError, build_model
from gaussreg.science.regularizer import moment_loss

MODELS_PY = '''
import torch
from torch import nn
from gaussreg.science.models import NormalizedConv2d


class Block(nn.Module):
    """A residual block: conv-BN-ReLU-conv-BN, plus the input, then ReLU."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class TinyResNet(nn.Module):
    def __init__(self, info, width=8, blocks=2):
        super().__init__()
        c = info.shape[0]
        # takes [0, 1] pixels: the dataset's normalisation folded into the first conv
        self.conv1 = NormalizedConv2d(c, width, 3, padding=1, bias=False, mean=info.mean, std=info.std)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layers = nn.Sequential(*[Block(width) for _ in range(blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, info.classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet(info, width=8, blocks=2):
    return TinyResNet(info, width, blocks)


def seq(info):
    c, h, w = info.shape
    return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                         nn.Flatten(), nn.Linear(4 * h * w, info.classes))


class Normalising(TinyResNet):
    def forward(self, x):  # normalises before conv1: the split would drop this
        return super().forward(x * 2 - 1)


def normalising(info):
    return Normalising(info)


class BnAfterRelu(TinyResNet):
    def forward(self, x):  # BN after the ReLU: close to the identity at init, still refused
        x = self.bn1(self.relu(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(self.layers(x)), 1))


def bn_after_relu(info):
    return BnAfterRelu(info)


class Swish(nn.Module):
    def __init__(self, info):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(info.shape[0], 4, 3), nn.GroupNorm(2, 4), nn.SiLU())
        self.head = nn.Linear(4, info.classes)

    def forward(self, x):
        return self.head(self.stem(x).mean((2, 3)))


def swish(info):
    return Swish(info)


def broken(info, width=8):
    raise ValueError(f"width {width} is not a power of two")


def not_a_module(info):
    return "resnet"
'''

DATA_PY = '''
import numpy as np
import psutil


def load(n=60):
    g = np.random.default_rng(0)
    protos = g.random((2, 1, 8, 8))
    y = g.integers(0, 2, n)
    x = np.clip(protos[y] + 0.1 * g.standard_normal((n, 1, 8, 8)), 0, 1).astype("float32")
    return {"x_train": x, "y_train": y, "x_test": x[:20], "y_test": y[:20]}
'''


def make_npz(path, n_train=400, n_test=100, classes=4, seed=0):
    """3x16x16 images: one smooth random prototype per class plus noise, uint8."""
    g = torch.Generator().manual_seed(seed)
    protos = nn.functional.interpolate(torch.rand(classes, 3, 4, 4, generator=g), size=(16, 16), mode="bilinear")

    def split(n):
        y = torch.randint(0, classes, (n,), generator=g)
        x = (protos[y] + 0.15 * torch.randn(n, 3, 16, 16, generator=g)).clamp(0, 1)
        return (x * 255).round().to(torch.uint8).numpy(), y.numpy()

    x, y = split(n_train)
    tx, ty = split(n_test)
    np.savez(path, x_train=x, y_train=y, x_test=tx, y_test=ty)


def make_package(root):
    pkg = root / "src" / "mypkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(MODELS_PY)
    (pkg / "data.py").write_text(DATA_PY)
    (root / "data").mkdir()
    make_npz(root / "data" / "tiny.npz")
    return root


MANIFEST = '''
python_path = ["src"]

[defaults]
dataset = "npz:data/tiny.npz"
model = "mypkg.models:resnet"
model_args = { width = 8 }
preset = "lenet"
optimizer = { lr = 0.01 }  # on top of the preset: Adam
batch_size = 50
max_epochs = 6  # 3 left some seeds at 41-55 % (eval-mode BN after 24 steps)
robustness = { sigmas = [0.0, 0.1, 0.2] }

[[experiment]]
name = "own"
tolerance = 1.0
methods.baseline = {}
methods.regularizer = { sigma = 0.1, alpha = 1.0 }
'''


def write(root, text, name="m.toml"):
    (root / name).write_text(textwrap.dedent(text))
    return root / name


@pytest.fixture
def project(tmp_path):
    return make_package(tmp_path)


def run(*args):
    return subprocess.run(cli(*args), capture_output=True, text=True, env=python_env(COLUMNS="200"))


@pytest.mark.process
def test_own_resnet_and_npz_through_the_scheduler_to_a_fair_table(project):
    m = write(project, MANIFEST)
    dry = run("run", m, "--store", project / "runs", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "2 runs" in dry.stdout
    out = run("run", m, "--store", project / "runs", "--gpus", "none")
    assert out.returncode == 0, out.stdout + out.stderr
    table = json.loads(run("table", "--store", project / "runs", "--format", "json").stdout)
    comp = table[0] if isinstance(table, list) else table
    text = json.dumps(comp)
    for method in ("baseline", "regularizer"):
        assert f'"{method}"' in text
    ls = json.loads(run("ls", "--store", project / "runs", "--format", "json").stdout)
    assert len(ls) == 2 and {r["state"] for r in ls} == {"completed"}
    accs = [r["result"]["test_accuracy"] for r in ls]
    assert all(a > 0.5 for a in accs), accs  # 4 classes: chance is 0.25
    spec = json.loads((project / "runs" / ls[0]["id"] / "spec.json").read_text())
    assert spec["model"] == "mypkg.models:resnet" and spec["model_args"] == {"width": 8}
    assert spec["dataset"] == f"npz:{project / 'data' / 'tiny.npz'}" and len(spec["model_source"]) == 12
    assert spec["python_path"] == [str(project / "src")]
    ev = run("eval", ls[0]["id"], "--store", project / "runs", "--sigmas", "0,0.1", "--format", "json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["clean_accuracy"] == ls[0]["result"]["test_accuracy"]


def test_model_args_are_grid_axes_and_changed_code_makes_new_runs(project):
    m = write(project, MANIFEST.replace("width = 8", "width = [4, 8]"))
    ids = [r.id for r in manifest.load(m).runs()]
    assert len(ids) == 4 and len(set(ids)) == 4
    widths = sorted(r.spec["model_args"]["width"] for r in manifest.load(m).runs())
    assert widths == [4, 4, 8, 8]
    src = project / "src" / "mypkg" / "models.py"
    src.write_text(src.read_text() + "\n# a comment changes the code\n")
    assert not set(ids) & {r.id for r in manifest.load(m).runs()}
    # python_path is where the code is, not what it is: not in the id
    spec = manifest.load(m).runs()[0].spec
    from gaussreg.runs.spec import run_id
    assert run_id({**spec, "python_path": ["/elsewhere"]}) == run_id(spec)


@pytest.mark.process
def test_reading_a_manifest_with_own_code_imports_neither_it_nor_torch(project):
    m = write(project, MANIFEST)
    code = (f"import sys; from gaussreg.runs import manifest; manifest.load({str(m)!r}); "
            "print('torch' in sys.modules, 'mypkg' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=python_env())
    assert out.returncode == 0 and out.stdout.split() == ["False", "False"], out.stderr


def test_a_changed_source_is_refused_by_the_worker(project):
    from gaussreg.runs.spec import changed_source
    spec = manifest.load(write(project, MANIFEST)).runs()[0].spec
    assert changed_source(spec) is None
    src = project / "src" / "mypkg" / "models.py"
    src.write_text(src.read_text() + "\n# edited after planning\n")
    assert "changed since this run was planned" in changed_source(spec)


@pytest.mark.process  # asks nvidia-smi where it is installed
def test_train_force_on_changed_code_is_refused_and_the_completed_run_stands(project):
    from gaussreg.runs.store import Store, atomic_write_json
    spec = manifest.load(write(project, MANIFEST)).runs()[0].spec
    st = Store(project / "runs")
    r = st.create(spec, "own-run")
    r.write_status({"state": "completed", "finished_at": "2026-12-06T10:00:00Z"})
    atomic_write_json(r.result_file, {"test_accuracy": 0.9, "robustness": 0.8})
    src = project / "src" / "mypkg" / "models.py"
    src.write_text(src.read_text() + "\n# edited after training\n")
    out = gaussreg("train", r.path, "--force")
    assert out.exit_code == 2 and "changed since this run was planned" in out.stderr, out.stderr
    # the refusal is this attempt's, not the run's: it stays completed with its result
    assert r.status()["state"] == "completed" and r.result()["test_accuracy"] == 0.9
    assert "refused to train again" in r.file("worker.log").read_text()
    # nor do eval and certify put other code around its weights
    r.best_checkpoint.write_bytes(b"weights")
    for cmd in ("eval", "certify"):
        out = gaussreg(cmd, r.id, "--store", st.root)
        assert out.exit_code == 2 and "changed since this run was planned" in out.stderr, (cmd, out.stderr)


def test_split_of_a_torchvision_style_module_and_of_a_sequential(project):
    info = datasets.DatasetInfo("t", (3, 16, 16), 4, (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    net = build_model("mypkg.models:resnet", info, {"width": 4}, [str(project / "src")])
    assert isinstance(net.first, models.FirstBlock) and isinstance(net.first.bn, nn.BatchNorm2d)
    x = torch.rand(6, 3, 16, 16)
    torch.manual_seed(1)
    ref = build_model("mypkg.models:resnet", info, {"width": 4}, [str(project / "src")])
    # the same weights in the unsplit module give the same outputs (eval mode)
    net.eval()
    with torch.no_grad():
        h = net.first(x)
        assert torch.allclose(net(x), net.rest(torch.relu(h)))
    seq = build_model("mypkg.models:seq", info, None, [str(project / "src")])
    assert isinstance(seq.first, models.FirstBlock) and len(seq.rest) == 2
    del ref
    # the regularizer trains through BN in the first block and in the residual blocks
    net.train()
    y = torch.randint(0, 4, (6,))
    loss = moment_loss(net, x, y, 0.2, 1.0)
    loss.total.backward()
    assert net.first.affine.weight.grad.abs().sum() > 0 and net.first.bn.weight.grad.abs().sum() > 0
    # the clean half is the plain forward pass, with the same running statistics after it
    torch.manual_seed(2)
    a = build_model("mypkg.models:resnet", info, {"width": 4}, [str(project / "src")])
    b = build_model("mypkg.models:resnet", info, {"width": 4}, [str(project / "src")])
    b.load_state_dict(a.state_dict())
    logits = moment_loss(a, x, y, 0.2, 1.0).logits
    assert torch.allclose(logits, b(x), atol=1e-5)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(v.float(), w.float(), atol=1e-6), k


def test_refusals_each_with_its_sentence(project):
    info = datasets.DatasetInfo("t", (3, 16, 16), 4, (0.5,) * 3, (0.25,) * 3)
    path = [str(project / "src")]
    with pytest.raises(SplitError, match=r"its first layers are Conv2d \(stem.0\), GroupNorm \(stem.1\), SiLU "
                                         r"\(stem.2\); recognised are a GaussNet"):
        build_model("mypkg.models:swish", info, None, path)
    for wrong in ("normalising", "bn_after_relu"):
        with pytest.raises(SplitError, match=r"its forward does not start with relu\(bn1\(conv1\(x\)\)\)"):
            build_model(f"mypkg.models:{wrong}", info, None, path)
    # the check leaves the model's own BatchNorm as it was built
    net = build_model("mypkg.models:resnet", info, None, path)
    assert torch.equal(net.first.bn.running_var, torch.ones(8)) and torch.equal(net.first.bn.weight, torch.ones(8))
    with pytest.raises(plugins.PluginError, match="model factory 'mypkg.models:broken' raised ValueError: "
                                                  "width 3 is not a power of two"):
        build_model("mypkg.models:broken", info, {"width": 3}, path)
    with pytest.raises(SplitError, match="returned a str, not an nn.Module"):
        build_model("mypkg.models:not_a_module", info, None, path)
    with pytest.raises(plugins.PluginError, match="module 'mypkg.models' has no attribute 'nope'"):
        build_model("mypkg.models:nope", info, None, path)
    with pytest.raises(SplitError, match=r"nn.Sequential of model 'custom': it starts with Conv2d, Tanh"):
        models.as_gaussnet(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten()))
    # depth > 1 through a module ADF does not know: refused with a sentence
    net = build_model("mypkg.models:resnet", info, None, path)
    from gaussreg.science import adf
    with pytest.raises(TypeError, match="propagates moments through TinyResNet, which is not supported"):
        adf.split(net.rest, 2)


def _manifest_error(project, text):
    with pytest.raises(manifest.ManifestError) as e:
        manifest.load(write(project, text))
    return str(e.value)


def test_manifest_refusals_name_file_line_and_key(project):
    m = str(project / "m.toml")
    e = _manifest_error(project, MANIFEST.replace('preset = "lenet"\n', "").replace("lr = 0.01", "name = \"sgd\""))
    assert e.startswith(f"{m}:") and "has no optimiser preset: give preset = \"lenet\" or \"alexnet\"" in e
    assert e.endswith("or set lr_patience, lr_factor, early_stop, optimizer.lr, optimizer.momentum, "
                      "optimizer.nesterov, optimizer.weight_decay")
    e = _manifest_error(project, MANIFEST.replace('preset = "lenet"', 'preset = "resnet"'))
    assert f"{m}:8: preset: 'preset' must be 'lenet' or 'alexnet'" in e
    e = _manifest_error(project, MANIFEST.replace("tiny.npz", "gone.npz"))
    assert f"{m}:5: dataset:" in e and "gone.npz of dataset" in e and "does not exist" in e
    e = _manifest_error(project, MANIFEST.replace("mypkg.models:resnet", "otherpkg.models:resnet"))
    assert f"{m}:6: model: cannot find the source of module 'otherpkg.models'" in e and "python_path" in e
    e = _manifest_error(project, MANIFEST.replace("mypkg.models:resnet", "resnet18"))
    assert f"{m}:6: model: unknown model 'resnet18'" in e and "gaussreg.models" in e
    e = _manifest_error(project, MANIFEST.replace('["src"]', '["nosrc"]'))
    assert f"{m}:2: python_path: folder" in e and "does not exist" in e
    # without a preset, a complete optimiser and the schedule keys are enough
    full = MANIFEST.replace("optimizer = { lr = 0.01 }  # on top of the preset: Adam\n", "").replace(
        'preset = "lenet"', 'optimizer = { name = "sgd", lr = 0.05, momentum = 0.9, '
                            'nesterov = false, weight_decay = 0.0 }\nlr_patience = 2\nlr_factor = 0.5\n'
                            'early_stop = 5')
    assert manifest.load(write(project, full)).runs()[0].spec["optimizer"]["lr"] == 0.05


@pytest.mark.process
def test_dry_run_imports_and_tries_each_factory_in_a_subprocess(project):
    bad = MANIFEST.replace("mypkg.models:resnet", "mypkg.models:broken").replace("width = 8", "width = 6")
    out = run("run", write(project, bad), "--store", project / "runs", "--dry-run")
    assert out.returncode == 2
    assert f"{project / 'm.toml'}:6: model: model factory 'mypkg.models:broken' raised ValueError: width 6 is not " \
           "a power of two" in " ".join(out.stderr.split())
    depth = MANIFEST.replace("alpha = 1.0 }", "alpha = 1.0, depth = 2 }")
    out = run("run", write(project, depth), "--store", project / "runs", "--dry-run")
    assert out.returncode == 2 and "methods.regularizer.depth: the regularizer at depth 2 fails" in \
        " ".join(out.stderr.split())
    swish = MANIFEST.replace("mypkg.models:resnet", "mypkg.models:swish").replace("model_args = { width = 8 }", "")
    out = run("run", write(project, swish), "--store", project / "runs", "--dry-run")
    assert out.returncode == 2 and "GroupNorm (stem.1)" in out.stderr
    assert not (project / "runs").exists()  # nothing written


@pytest.mark.process
def test_dry_run_of_one_experiment_checks_only_its_runs_and_shows_each_factorys_arguments(project):
    """--experiment good trains only good: another experiment's broken model must not refuse
    its dry run; and dataset_args stand under the dataset, model_args under the model."""
    two = (MANIFEST.replace('"npz:data/tiny.npz"', '"mypkg.data:load"\ndataset_args = { n = 40 }')
           + '\n[[experiment]]\nname = "bad"\nmodel = "mypkg.models:broken"\nmethods.baseline = {}\n')
    m = write(project, two)
    out = run("run", m, "--store", project / "runs", "--dry-run")
    assert out.returncode == 2 and "model factory 'mypkg.models:broken' raised ValueError" in out.stderr
    out = run("run", m, "--store", project / "runs", "--dry-run", "--experiment", "own")
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if "own-baseline-" in line)
    cells = [c.strip() for c in row.split("\u2502") if c.strip()]  # the table's column rule
    assert cells[1:4] == ["mypkg.data:load n=40", "mypkg.models:resnet width=8", "baseline"], cells
    assert "own: 2 new, 0 done" in out.stdout and "bad" not in out.stdout
    assert not (project / "runs").exists()


def test_a_loader_by_import_path_with_mean_and_std_computed(project):
    x, y, tx, ty, info = data.load_custom("mypkg.data:load", {"n": 40}, [str(project / "src")])
    assert x.shape == (40, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert info.classes == 2 and info.shape == (1, 8, 8)
    assert info.mean[0] == pytest.approx(float(x.mean()), abs=1e-6)
    assert info.std[0] == pytest.approx(float(x.std()), rel=1e-5)
    splits = data.load("mypkg.data:load", split_seed=0, args={"n": 40}, python_path=[str(project / "src")])
    assert splits.sizes() == {"train": 36, "val": 4, "test": 20}


def test_npz_refusals(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.full((4, 3, 2, 2), 2.0), y_train=np.zeros(4, int), x_test=np.zeros((1, 3, 2, 2)),
             y_test=np.zeros(1, int))
    with pytest.raises(data.DataError, match="float images must be in \\[0, 1\\]"):
        data.load_custom(f"npz:{bad}", {}, ())
    np.savez(bad, x_train=np.zeros((4, 2, 2, 3), np.uint8), y_train=np.zeros(4, int))
    with pytest.raises(data.DataError, match="has no x_test, y_test"):
        data.load_custom(f"npz:{bad}", {}, ())
    np.savez(bad, x_train=np.zeros((4, 3, 2, 2), np.uint8), y_train=np.zeros(3, int),
             x_test=np.zeros((1, 3, 2, 2), np.uint8), y_test=np.zeros(1, int))
    with pytest.raises(data.DataError, match="y_train must be 4 integer labels"):
        data.load_custom(f"npz:{bad}", {}, ())
    # classes is a count: class names (a TypeError blamed on the model before) are refused by name
    ok = dict(x_train=np.zeros((6, 3, 2, 2), np.uint8), y_train=np.array([0, 1, 2, 1, 0, 2]),
              x_test=np.zeros((1, 3, 2, 2), np.uint8), y_test=np.zeros(1, int))
    np.savez(bad, **ok, classes=np.array(["a", "b", "c"]))
    with pytest.raises(data.DataError, match=r"classes must be the number of classes \(an integer >= 1\), "
                                             r"not \['a', 'b', 'c'\]"):
        data.load_custom(f"npz:{bad}", {}, ())
    np.savez(bad, **ok, classes=5)
    assert data.load_custom(f"npz:{bad}", {}, ())[-1].classes == 5


def test_image_folder_of_pngs(tmp_path):
    from PIL import Image
    g = np.random.default_rng(0)
    for cls, level in (("cat", 40), ("dog", 200)):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(5):
            size = (12, 10) if i % 2 else (8, 8)  # mixed sizes: resized
            arr = np.clip(level + g.integers(-10, 10, (*size[::-1], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(data.DataError, match="different sizes"):
        data.load_custom(f"folder:{tmp_path / 'imgs'}", {}, ())
    x, y, tx, ty, info = data.load_custom(f"folder:{tmp_path / 'imgs'}", {"size": 6}, ())
    assert info.classes == 2 and info.shape == (3, 6, 6) and x.dtype == torch.uint8
    assert len(x) + len(tx) == 10 and len(tx) == 2 and sorted(ty.tolist()) == [0, 1]  # stratified 20%
    # class 0 is "cat" (sorted folder names), dark; "dog" bright
    assert x[y == 0].float().mean() < 60 and x[y == 1].float().mean() > 180
    gray = data.load_custom(f"folder:{tmp_path / 'imgs'}", {"size": [[4, 5]][0], "channels": 1}, ())
    assert gray[0].shape[1:] == (1, 4, 5)
    with pytest.raises(data.DataError, match="unknown dataset_args key 'resize'"):
        data.load_custom(f"folder:{tmp_path / 'imgs'}", {"resize": 6}, ())


def test_entry_point_names_for_models_and_datasets(project, monkeypatch):
    # an installed package's entry points: a dist-info folder on sys.path is what pip leaves
    dist = project / "src" / "mypkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[gaussreg.models]\ntinyres = mypkg.models:resnet\n\n"
                                           "[gaussreg.datasets]\nblobs = mypkg.data:load\n")
    monkeypatch.syspath_prepend(str(project / "src"))
    plugins.entry_points.cache_clear()
    try:
        m = write(project, MANIFEST.replace("mypkg.models:resnet", "tinyres")
                  .replace('"npz:data/tiny.npz"', '"blobs"\ndataset_args = { n = [30, 40] }'))
        runs = manifest.load(m).runs()
        assert len(runs) == 4 and {r.spec["dataset_args"]["n"] for r in runs} == {30, 40}
        spec = runs[0].spec
        assert spec["model"] == "tinyres" and len(spec["model_source"]) == 12 and len(spec["dataset_source"]) == 12
        splits = data.load("blobs", args={"n": 30})
        net = build_model("tinyres", splits.info, {"width": 4})
        assert net(splits.test_x[:3]).shape == (3, 2)
    finally:
        plugins.entry_points.cache_clear()


def test_a_sequential_with_batchnorm_first_supports_depth(project):
    info = datasets.DatasetInfo("t", (3, 8, 8), 4, (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    net = build_model("mypkg.models:seq", info, None, [str(project / "src")]).double()
    from gaussreg.science.regularizer import expected_logits
    x, y = torch.rand(5, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (5,))
    net.train()
    moment_loss(net, x, y, 0.2, 1.0, depth="all").total.backward()  # BN statistics of the batch
    net.eval()
    # rest is affine (Flatten, Linear): propagating to the logits is exact, so "all" = 1
    assert torch.allclose(expected_logits(net, x, 0.2, "all"), expected_logits(net, x, 0.2, 1), atol=1e-10)


HANGING_PY = '''
import os, time
from pathlib import Path


def hang(info):
    Path(os.environ["HANG_PID_FILE"]).write_text(str(os.getpid()))
    while True:  # a factory that never returns
        time.sleep(0.1)
'''


@pytest.mark.process
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_the_dry_run_check_of_a_hanging_factory_dies_with_its_parent(project, sig):
    (project / "src" / "mypkg" / "hanging.py").write_text(HANGING_PY)
    m = write(project, MANIFEST.replace("mypkg.models:resnet", "mypkg.hanging:hang").replace("model_args = { width = 8 }", ""))
    pid_file = project / "check.pid"
    p = subprocess.Popen(cli("run", m, "--store", project / "runs", "--dry-run"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=python_env(HANG_PID_FILE=str(pid_file)))
    deadline = time.time() + 120
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline and p.poll() is None, "the check never reached the factory"
        time.sleep(0.05)
    check = psutil.Process(int(pid_file.read_text()))
    p.send_signal(sig)
    p.wait(timeout=30)
    try:
        check.wait(timeout=10)  # gone within seconds, not when the factory returns (never)
    except psutil.TimeoutExpired:
        check.kill()
        pytest.fail(f"the check process {check.pid} outlived its parent killed by {sig.name}")
