import pytest
from conftest import gaussreg

from gaussreg.runs import manifest

GOOD = """\
[defaults]
dataset = "synthetic"
model = "mlp"
max_epochs = 3

[[experiment]]
name = "grid"
tolerance = 0.01
dataset = ["synthetic", "mnist"]
seeds = [0, 1]
methods.baseline = {}
methods.augment = { sigma = [0.1, 0.2], folds = [2, 6] }

[[experiment]]
name = "other"
methods.regularizer = { sigma = 0.5, alpha = [1, 2] }
optimizer = { lr = 0.01 }
robustness = { sigmas = [0.0, 0.5], samples = 2 }
"""


def test_expansion_and_stable_ids(tmp_path):
    p = tmp_path / "m.toml"
    p.write_text(GOOD)
    m = manifest.load(p)
    grid, other = m.experiments
    assert grid.name == "grid" and grid.tolerance == 0.01 and other.tolerance == 0.0
    assert len(grid.runs) == 2 * 2 * (1 + 4) and len(other.runs) == 2
    ids = [r.id for r in m.runs()]
    assert len(set(ids)) == len(ids) and all(i.startswith(("grid-", "other-")) for i in ids)
    assert [r.id for r in manifest.load(p).runs()] == ids  # same manifest, same ids
    spec = other.runs[1].spec
    assert spec["params"] == {"sigma": 0.5, "alpha": 2.0} and spec["optimizer"]["lr"] == 0.01
    assert spec["optimizer"]["name"] == "adam" and spec["batch_size"] == 1000  # the lenet/mlp preset
    assert spec["robustness"] == {"sigmas": [0.0, 0.5], "samples": 2, "clip": False}
    assert {r.spec["seed"] for r in grid.runs} == {0, 1}
    # a new tolerance keeps the ids; a changed grid value changes only its runs
    p.write_text(GOOD.replace("tolerance = 0.01", "tolerance = 0.02").replace("folds = [2, 6]", "folds = [2, 7]"))
    ids2 = [r.id for r in manifest.load(p).runs()]
    assert len(set(ids) & set(ids2)) == len(ids) - 8
    assert len(m.select("other")) == 2 and len(m.select("*augment*")) == 16 and len(m.select("baseline")) == 4



def test_precision_and_compile_are_run_keys_that_keep_old_ids(tmp_path):
    """`precision` (auto, fp32, bf16) and `compile` are grid-able run keys; at their
    defaults they are left out of the id, so runs planned before they existed keep theirs."""
    from gaussreg.runs.spec import SpecError, canonical, resolve, run_id
    base = {"dataset": "synthetic", "model": "mlp", "method": "baseline"}
    spec = resolve(base)
    assert spec["precision"] == "auto" and spec["compile"] is False
    old = {k: v for k, v in spec.items() if k not in ("precision", "compile")}  # a spec.json from before
    assert run_id(resolve(old)) == run_id(spec) and "precision" not in canonical(spec)
    ids = {run_id(resolve({**base, "precision": p})) for p in ("auto", "fp32", "bf16")}
    assert len(ids) == 3 and run_id(resolve({**base, "compile": True})) != run_id(spec)
    for key, bad, words in (("precision", "fp16", "'precision' must be auto, fp32 or bf16"),
                            ("compile", "yes", "'compile' must be bool")):
        with pytest.raises(SpecError, match=words):
            resolve({**base, key: bad})
    p = tmp_path / "m.toml"
    p.write_text(GOOD.replace('name = "other"', 'name = "other"\nprecision = ["fp32", "bf16"]\ncompile = true'))
    other = manifest.load(p).experiments[1]
    assert sorted((r.spec["precision"], r.spec["params"]["alpha"]) for r in other.runs) == [
        ("bf16", 1.0), ("bf16", 2.0), ("fp32", 1.0), ("fp32", 2.0)] and all(r.spec["compile"] for r in other.runs)


def test_augment_noise_modes_keep_fresh_ids_and_give_bank_runs_new_ones(tmp_path):
    """The ids of main at df7ee7c: fresh noise keeps its id in either spelling; fixed noise
    (fresh_noise = false) was drawn from noise bank 1, which could hold +-inf (issue 29), so
    its runs are new runs of bank 2, one id for both spellings; shared noise is a third run."""
    p = tmp_path / "m.toml"
    head = '[defaults]\ndataset = "fashion-mnist"\nmodel = "lenet"\n[[experiment]]\nname = "e"\n'
    ids = {}
    for spelling in ("", ", fresh_noise = true", ', noise = "fresh"', ", fresh_noise = false", ', noise = "fixed"',
                     ', noise = "fixed", fresh_noise = false', ', noise = "shared"'):
        p.write_text(head + f"methods.augment = {{ sigma = 0.25, folds = 5{spelling} }}\n")
        (run,) = manifest.load(p).runs()
        ids[spelling] = run.id
    assert ids[""] == ids[", fresh_noise = true"] == ids[', noise = "fresh"'] == "e-augment-986b140173"
    assert ids[", fresh_noise = false"] != "e-augment-c3e7feb850"  # its id before issue 29, bank 1
    assert ids[", fresh_noise = false"] == ids[', noise = "fixed"'] == ids[', noise = "fixed", fresh_noise = false']
    assert len({ids[""], ids[', noise = "fixed"'], ids[', noise = "shared"']}) == 3
    p.write_text(head + 'methods.augment = { sigma = 0.25, folds = 5, noise = ["fresh", "fixed", "shared"] }\n')
    from gaussreg.runs.spec import describe_params
    assert [describe_params(r.spec) for r in manifest.load(p).runs()] == [
        "folds=5 sigma=0.25", "folds=5 noise=fixed sigma=0.25", "folds=5 noise=shared sigma=0.25"]


def test_cli_run_with_a_bad_noise_mode_is_one_error(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[[experiment]]\nname = "a"\ndataset = "synthetic"\nmodel = "mlp"\n'
                 'methods.augment = { sigma = [0.1, 0.2], folds = [1, 2], noise = "random" }\n')
    out = gaussreg("run", p, "--store", tmp_path / "runs")
    assert out.exit_code == 2 and not (tmp_path / "runs").exists()
    assert out.stderr.strip() == (f"error: {p}:5: methods.augment.noise: parameter 'noise' of method 'augment' "
                                  "must be 'fresh', 'fixed' or 'shared' (got 'random')"), out.stderr


def test_a_method_may_have_several_tables_each_with_its_own_seeds(tmp_path):
    """A wide grid at one seed and its chosen configuration at more seeds, in one experiment
    (what a study does): `methods.X` may be an array of tables, and a table's `seeds`
    replaces the experiment's seed axis for its grid points only."""
    p = tmp_path / "m.toml"
    p.write_text('[defaults]\ndataset = "synthetic"\nmodel = "mlp"\n[[experiment]]\nname = "study"\nseed = 0\n'
                 'methods.baseline = { seeds = [0, 1, 2] }\n'
                 'methods.regularizer = [{ sigma = [0.5, 1], alpha = [1, 2] }, { sigma = 1, alpha = 2, seeds = [1, 2] }]\n')
    e = manifest.load(p).experiments[0]
    got = sorted((r.spec["method"], r.spec["params"].get("sigma"), r.spec["params"].get("alpha"), r.spec["seed"])
                 for r in e.runs)
    assert got == [("baseline", None, None, 0), ("baseline", None, None, 1), ("baseline", None, None, 2),
                   ("regularizer", 0.5, 1.0, 0), ("regularizer", 0.5, 2.0, 0), ("regularizer", 1.0, 1.0, 0),
                   ("regularizer", 1.0, 2.0, 0), ("regularizer", 1.0, 2.0, 1), ("regularizer", 1.0, 2.0, 2)]
    # the seeds of one configuration are runs of one configuration (the fair table's seeds)
    from gaussreg.views.report import config_key
    win = [r.spec for r in e.runs if r.spec["params"] == {"sigma": 1.0, "alpha": 2.0}]
    assert len(win) == 3 and len({config_key(s) for s in win}) == 1
    # overlapping tables repeat a run: refused, like a grid repeating a value
    p.write_text(p.read_text().replace("seeds = [1, 2] }]", "seeds = [0, 1] }]"))
    with pytest.raises(manifest.ManifestError, match="two tables of a method overlap"):
        manifest.load(p)


BAD = [
    ('methods.augment = { sigmas = [0.1], folds = 2 }', 6, "methods.augment.sigmas", "did you mean 'sigma'"),
    ('methods.regularizer = { sigma = [], alpha = 1 }', 6, "methods.regularizer.sigma", "empty grid"),
    ('methods.regularizer = { sigma = 0.1, alpha = -1 }', 6, "methods.regularizer.alpha", "must be >= 0"),
    ('methods.augment = { sigma = 0.1, folds = 0 }', 6, "methods.augment.folds", "must be >= 1"),
    ('methods.mixup = {}', 6, "methods.mixup", "unknown method 'mixup'"),
    ('methods.baseline = {}\nmax_epochs = "ten"', 7, "max_epochs", "must be int"),
    ('methods.baseline = {}\nmax_epochs = -3', 7, "max_epochs", "must be >= 1"),
    ('methods.baseline = {}\ndataset = "imagenet"', 7, "dataset", "unknown dataset 'imagenet'"),
    ('methods.baseline = {}\nmodel = ["lenet", "vgg"]', 7, "model", "unknown model 'vgg'"),
    ('methods.baseline = {}\ntolerence = 0.1', 7, "tolerence", "did you mean 'tolerance'"),
    ('methods.baseline = {}\ntolerance = 5', 7, "tolerance", "fraction"),
    ('methods.baseline = {}\nseeds = []', 7, "seeds", "non-empty list"),
    ('methods.baseline = {}\nseeds = [0, -1]', 7, "seeds", "non-empty list of integers >= 0"),
    ('methods.baseline = {}\noptimizer = { lr = 0 }', 7, "optimizer.lr", "must be > 0"),
    ('methods.baseline = {}\nrobustness = { sigma = [0.1] }', 7, "robustness.sigma", "unknown key"),
    ('methods = {}', 6, "methods", "non-empty 'methods'"),
    ('methods.baseline = { seeds = [-1] }', 6, "methods.baseline.seeds", "non-empty list of integers >= 0"),
    ('methods.baseline = [{}, 3]', 6, "methods.baseline", "or an array of such tables"),
    ('methods.augment = { sigma = 0.1, folds = 1, noise = ["fixed", "sharde"] }', 6, "methods.augment.noise",
     "parameter 'noise' of method 'augment' must be 'fresh', 'fixed' or 'shared' (got 'sharde')"),
    ('methods.augment = { sigma = 0.1, folds = 1, noise = "shared", fresh_noise = false }', 6,
     "methods.augment.noise", "fresh_noise = false is the old spelling of noise = 'fixed', not 'shared'"),
]


@pytest.mark.parametrize("body,line,key,needle", BAD)
def test_errors_name_file_line_and_key(tmp_path, body, line, key, needle):
    p = tmp_path / "bad.toml"
    p.write_text(f'[defaults]\ndataset = "synthetic"\nmodel = "mlp"\n[[experiment]]\nname = "e"\n{body}\n')
    with pytest.raises(manifest.ManifestError) as e:
        manifest.load(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line}: {key}: "), msg
    assert needle in msg, msg


def test_defaults_errors_point_into_defaults(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[defaults]\nmodel = "mlp"\nmax_epoch = 3\n\n[[experiment]]\nname = "e"\nmethods.baseline = {}\n')
    with pytest.raises(manifest.ManifestError, match=r"bad.toml:3: max_epoch: .*did you mean 'max_epochs'"):
        manifest.load(p)


def test_duplicate_names_and_toml_syntax(tmp_path):
    p = tmp_path / "dup.toml"
    p.write_text('[[experiment]]\nname = "a"\nmethods.baseline = {}\ndataset = "synthetic"\nmodel = "mlp"\n'
                 '[[experiment]]\nname = "a"\nmethods.baseline = {}\ndataset = "synthetic"\nmodel = "mlp"\n')
    with pytest.raises(manifest.ManifestError, match=r"dup.toml:7: name: duplicate experiment name 'a'"):
        manifest.load(p)
    p.write_text('[[experiment]]\nname = "a"\nmethods.baseline = {\n')
    with pytest.raises(manifest.ManifestError, match=r"dup.toml:3: not valid TOML"):
        manifest.load(p)
    with pytest.raises(manifest.ManifestError, match="does not exist"):
        manifest.load(tmp_path / "missing.toml")


def test_cli_run_with_a_bad_manifest_launches_nothing(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[[experiment]]\nname = "a"\ndataset = "synthetic"\nmodel = "mlp"\n'
                 'methods.augment = { sigmas = 0.1, folds = 2 }\n')
    out = gaussreg("run", p, "--store", tmp_path / "runs")
    assert out.exit_code == 2
    assert f"{p}:5: methods.augment.sigmas: unknown parameter 'sigmas'" in " ".join(out.stderr.split())
    assert "Traceback" not in out.stderr and not (tmp_path / "runs").exists()


def test_shipped_manifests_are_valid():
    from conftest import ROOT
    demo = manifest.load(ROOT / "experiments.toml")
    methods = {r.spec["method"] for r in demo.runs()}
    assert {"baseline", "augment", "regularizer"} <= methods and len(demo.runs()) <= 6
    lenet = manifest.load(ROOT / "experiments" / "paper-lenet.toml")
    alex = manifest.load(ROOT / "experiments" / "paper-alexnet.toml")
    tol = {e.name: e.tolerance for e in lenet.experiments + alex.experiments}
    paper = {"lenet-mnist": 0.0, "lenet-cifar10": 0.0039, "lenet-cifar100": 0.0075,
             "alexnet-cifar10": 0.0168, "alexnet-cifar100": 0.0483}  # AlexNet's: read from Fig. 5's caption
    assert tol == {**paper, **{f"{n}-{mode}-noise": t for n, t in paper.items() for mode in ("fixed", "fresh")},
                   "lenet-mnist-seed-methods": 0.0, "alexnet-cifar10-seed-methods": 0.0168,
                   "lenet-mnist-noise-methods": 0.0,
                   "lenet-cifar10-reference-units": 0.0039, "lenet-cifar100-reference-units": 0.0075,
                   "alexnet-cifar10-reference-units": 0.0168, "alexnet-cifar100-reference-units": 0.0483}
    mnist = lenet.experiments[0]
    counts = {m: sum(r.spec["method"] == m for r in mnist.runs) for m in ("baseline", "augment", "regularizer")}
    assert counts == {"baseline": 1, "augment": 20, "regularizer": 63}
    # the paper's N~ in {2, 6, 11, 21} is folds + 1 (the clean copy); the paper experiments augment as the
    # reference code did (one noise tensor per copy), the independent modes are experiments of their own
    for e in lenet.experiments + alex.experiments:
        aug = [r.spec["params"] for r in e.runs if r.spec["method"] == "augment"]
        if aug:
            assert sorted({p["folds"] for p in aug}) == [1, 5, 10, 20], e.name
            mode = e.name.rsplit("-", 2)[1] if e.name.endswith("-noise") else "shared"
            assert {p.get("noise", "fresh") for p in aug} == {mode}, e.name
            assert sorted({p["sigma"] for p in aug}) == [0.125, 0.25, 0.325, 0.5, 1.0], e.name
            full = e.name in paper or e.name.endswith("-reference-units")  # the paper's grid in other units
            assert {r.spec["method"] for r in e.runs} == (
                {"baseline", "augment", "regularizer"} if full else {"baseline", "augment"}), e.name
    all_methods = {r.spec["method"] for r in lenet.runs() + alex.runs()}
    assert {"randsign", "fgsm", "consistency", "stability"} <= all_methods
    noise = next(e for e in lenet.experiments if e.name == "lenet-mnist-noise-methods")
    assert sum(r.spec["method"] == "consistency" for r in noise.runs) == 15
    assert sum(r.spec["method"] == "stability" for r in noise.runs) == 20


def test_every_error_is_reported_in_one_pass_with_its_table(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[defaults]\nmax_epoch = 3\ndataset = "synthetic"\n\n'
                 '[[experiment]]\nname = "a"\nmodel = "mlpp"\ntolerence = 0.1\nmethods.baseline = {}\n'
                 'methods.regularizer = { sigma = 0.25, alhpa = 1 }\n\n'
                 '[[experiment]]\nname = "a"\nmethods.augment = { sigma = -1, folds = 2 }\n')
    with pytest.raises(manifest.ManifestError) as e:
        manifest.load(p)
    lines = str(e.value).splitlines()
    assert lines[0] == f"{p}: 7 problems, each on its own line:"
    assert [x.strip() for x in lines[1:]] == [
        f"{p}:2: max_epoch: unknown key in [defaults] (did you mean 'max_epochs'?)",
        f"{p}:7: model: unknown model 'mlpp'; must be one of lenet, alexnet, mlp, a factory's import path (mypkg.models:build) or a name registered under the entry-point group gaussreg.models",
        f"{p}:8: tolerence: unknown key in [[experiment]] 'a' (did you mean 'tolerance'?)",
        f"{p}:10: methods.regularizer.alhpa: unknown parameter 'alhpa' for method 'regularizer' (did you mean 'alpha'?)",
        f"{p}:12: model: [[experiment]] 'a' needs a 'model' (in it or in [defaults])",
        f"{p}:13: name: duplicate experiment name 'a'",
        f"{p}:14: methods.augment.sigma: parameter 'sigma' of method 'augment' must be >= 0 (got -1.0)"]
    assert len(e.value.errors) == 7 and e.value.errors[0].line == 2
    out = gaussreg("run", p, "--store", tmp_path / "runs", "--dry-run", COLUMNS="300")
    assert out.exit_code == 2 and out.stderr.count("\n") == 8 and "alhpa" in out.stderr
    assert not (tmp_path / "runs").exists()
