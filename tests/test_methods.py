import math

import pytest
import torch

from gaussreg.runs.spec import SpecError
from gaussreg.science.methods import METHOD_CLASSES, bank_noise, check_params, make_method, random_sign
from gaussreg.science.models import build_model


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_augment_epoch_holds_clean_images_and_independent_noisy_copies():
    m = make_method("augment", {"sigma": 0.5, "folds": 3})
    assert m.copies == 4
    X = torch.rand(50, 1, 8, 8)
    Y = torch.arange(50) % 10
    g = _gen()
    m.prepare(len(X), X.shape[1:], g)
    idx = torch.arange(len(X) * m.copies)
    x, y = m.batch(X, Y, idx, g)
    assert x.shape == (200, 1, 8, 8) and torch.equal(y, Y.repeat(4))
    assert torch.equal(x[:50], X)  # copy 0 is the clean image
    noise = (x[50:] - X.repeat(3, 1, 1, 1)) / 0.5
    assert abs(noise.std().item() - 1) < 0.03 and abs(noise.mean().item()) < 0.03
    # independent per image and per copy (the reference code shared one tensor)
    flat = noise.view(3, 50, -1)
    assert not torch.allclose(flat[0, 0], flat[0, 1]) and not torch.allclose(flat[0, 0], flat[1, 0])
    corr = torch.corrcoef(torch.stack([flat[0].flatten(), flat[1].flatten()]))[0, 1]
    assert abs(corr) < 0.05
    # fresh noise: the next epoch draws new noise
    x2, _ = m.batch(X, Y, idx, g)
    assert not torch.allclose(x2[50:], x[50:])


def test_augment_fixed_noise_repeats_across_epochs():
    m = make_method("augment", {"sigma": 0.25, "folds": 2, "fresh_noise": False})
    X, Y = torch.rand(10, 1, 4, 4), torch.arange(10)
    g = _gen()
    m.prepare(len(X), X.shape[1:], g)
    idx = torch.randperm(30, generator=_gen(3))
    a, ya = m.batch(X, Y, idx, g)
    b, yb = m.batch(X, Y, idx, g)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert (a - X[idx % 10]).abs().max() > 0.05


def test_fixed_noise_bank_is_a_function_of_seed_copy_and_image_only():
    m = make_method("augment", {"sigma": 1.0, "folds": 3, "fresh_noise": False})
    X, Y = torch.zeros(500, 3, 8, 8), torch.arange(500) % 10
    m.prepare(len(X), X.shape[1:], _gen(7))
    assert not hasattr(m, "fixed") or m.fixed is None  # nothing of size folds x n is held
    full, _ = m.batch(X, Y, torch.arange(2000), _gen(0))
    perm = torch.randperm(2000, generator=_gen(1))
    part, _ = m.batch(X, Y, perm[:300], _gen(5))  # any batch, any order, any generator state
    assert torch.equal(part, full[perm[:300]])
    z = full[500:].flatten()
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert abs((z.abs() > 1.96).float().mean().item() - 0.05) < 0.003  # Gaussian tails, not uniform
    copies = full[500:].view(3, 500, -1)
    assert abs(torch.corrcoef(torch.stack([copies[0].flatten(), copies[1].flatten()]))[0, 1]) < 0.01
    assert abs(torch.corrcoef(torch.stack([copies[0, :-1].flatten(), copies[0, 1:].flatten()]))[0, 1]) < 0.01
    other = make_method("augment", {"sigma": 1.0, "folds": 3, "fresh_noise": False})
    other.prepare(len(X), X.shape[1:], _gen(8))
    assert not torch.equal(other.batch(X, Y, torch.arange(2000), _gen(0))[0], full)  # the seed matters
    assert torch.equal(bank_noise(7, torch.tensor([3, 3]), (2, 5))[0], bank_noise(7, torch.tensor([3]), (2, 5))[0])


def test_the_bank_item_that_held_infinities_is_finite():
    """Bank version 1 put +-inf into two pixels of item 255,287 of seed 0: copy 5 of image
    39,287 of MNIST's 54,000 training images (issue 29); a batch holding it diverged."""
    m = make_method("augment", {"sigma": 0.5, "folds": 5, "fresh_noise": False})
    X = torch.zeros(1, 1, 28, 28).expand(54_000, 1, 28, 28)  # the size matters, the pixels do not
    m.prepare(len(X), X.shape[1:], _gen(0))
    x, _ = m.batch(X, torch.zeros(54_000, dtype=torch.long), torch.tensor([5 * 54_000 + 39_287]), _gen(0))
    assert torch.isfinite(x).all()
    assert torch.equal(x[0] / 0.5, bank_noise(0, torch.tensor([255_287]), (1, 28, 28))[0])


def test_the_bank_is_finite_and_standard_normal_over_ten_million_values():
    """10,035,200 values: 4 seeds x 3,200 MNIST-sized items (around the item above). Every
    value finite, |z| at most sqrt(-2 log 2^-24) = 5.77 (the uniform is exact), and mean,
    variance and the two-sided 3-sigma tail of N(0, 1) within 5 standard errors."""
    z = torch.cat([bank_noise(s, torch.arange(254_000, 257_200), (1, 28, 28)).flatten() for s in range(4)])
    n = z.numel()
    assert n >= 10_000_000 and torch.isfinite(z).all()
    assert z.abs().max().item() <= math.sqrt(-2 * math.log(2.0 ** -24)) + 1e-5
    z = z.double()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    p = math.erfc(3 / math.sqrt(2))  # P(|z| > 3) = 0.0027
    assert abs((z.abs() > 3).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_shared_noise_is_one_pattern_per_copy_as_the_reference_ran_it():
    """noise = "shared": every image of copy k gets the same noise (the reference's
    RNG(seed + offset) reseeding), bank item -k of the run's seed: the pattern depends on
    (seed, k) alone, not on the batch, its order, the generator's state or `folds`."""
    m = make_method("augment", {"sigma": 0.5, "folds": 20, "noise": "shared"})
    X, Y = torch.rand(30, 3, 8, 8), torch.arange(30) % 10
    m.prepare(len(X), X.shape[1:], _gen(11))
    full, y = m.batch(X, Y, torch.arange(30 * 21), _gen(0))
    assert torch.equal(y, Y.repeat(21)) and torch.equal(full[:30], X)  # copy 0 is clean
    pattern = bank_noise(11, -torch.arange(1, 21), (3, 8, 8))
    for k in range(1, 21):
        assert torch.equal(full[30 * k:30 * (k + 1)], X + 0.5 * pattern[k - 1]), k  # one noise for all images
    z = pattern.flatten().double()  # 20 patterns of 192 values: N(0, 1) within 5 standard errors
    assert abs(z.mean().item()) < 5 / math.sqrt(len(z)) and abs(z.var().item() - 1) < 5 * math.sqrt(2 / len(z))
    assert abs(torch.corrcoef(pattern.flatten(1))[0, 1:]).max() < 0.3  # copies differ (|r| ~ 0.07 at random)
    perm = torch.randperm(30 * 21, generator=_gen(2))
    part, _ = m.batch(X, Y, perm[:100], _gen(9))  # any batch, any order, any generator state
    assert torch.equal(part, full[perm[:100]])
    again = make_method("augment", {"sigma": 0.5, "folds": 3, "noise": "shared"})
    again.prepare(len(X), X.shape[1:], _gen(11))  # a resumed run prepares again from its seed
    assert torch.equal(again.batch(X, Y, torch.arange(30, 120), _gen(5))[0], full[30:120])
    other = make_method("augment", {"sigma": 0.5, "folds": 3, "noise": "shared"})
    other.prepare(len(X), X.shape[1:], _gen(12))
    assert not torch.equal(other.batch(X, Y, torch.arange(30, 120), _gen(5))[0], full[30:120])  # the seed matters
    fixed = make_method("augment", {"sigma": 0.5, "folds": 20, "noise": "fixed"})
    fixed.prepare(len(X), X.shape[1:], _gen(11))
    z = (fixed.batch(X, Y, torch.arange(30, 60), _gen(0))[0] - X) / 0.5  # fixed: independent per image
    assert not torch.allclose(z[0], z[1], atol=0.5)


def test_noise_mode_and_its_old_spelling():
    """fresh_noise = true/false is the old spelling of noise = "fresh"/"fixed"; both given
    must agree; a fresh run's spec keeps fresh_noise (so its id), fixed and shared ones
    record the bank's version."""
    from gaussreg.science.methods import BANK_VERSION, METHOD_CLASSES
    aug = METHOD_CLASSES["augment"]
    assert make_method("augment", {"sigma": 0.1, "folds": 1, "fresh_noise": False}).params["noise"] == "fixed"
    assert make_method("augment", {"sigma": 0.1, "folds": 1}).params["noise"] == "fresh"
    base = {"sigma": 0.1, "folds": 2}
    assert aug.spec_params({**base, "noise": "fresh"}) == aug.spec_params(base) == {**base, "fresh_noise": True}
    assert aug.spec_params({**base, "fresh_noise": False}) == aug.spec_params({**base, "noise": "fixed"}) == {
        **base, "noise": "fixed", "bank": BANK_VERSION}
    assert aug.spec_params({**base, "noise": "shared"}) == {**base, "noise": "shared", "bank": BANK_VERSION}
    assert aug.spec_params({**base, "noise": "fixed", "fresh_noise": False})["noise"] == "fixed"
    for spec in ({**base, "fresh_noise": True}, {**base, "noise": "fixed", "bank": 2}, {**base, "noise": "shared", "bank": 2}):
        assert aug.spec_params(spec) == spec  # a stored spec resolves to itself
    for bad, key, words in (({"noise": "shared", "fresh_noise": False}, "noise", "old spelling of noise = 'fixed'"),
                            ({"noise": "fresh", "fresh_noise": False}, "noise", "disagree"),
                            ({"noise": "random"}, "noise", "must be 'fresh', 'fixed' or 'shared' (got 'random')"),
                            ({"noise": True}, "noise", "must be str"),
                            ({"noise": "fixed", "bank": 1}, "bank", "must be 2"),
                            ({"bank": 2}, "bank", "fresh noise draws from none")):
        with pytest.raises(SpecError) as e:
            check_params("augment", {**base, **bad})
        assert e.value.key == f"params.{key}" and words in str(e.value)


def test_augment_validation_objective_is_clean_cross_entropy():
    torch.manual_seed(0)
    model = build_model("mlp", "synthetic")
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    clean = torch.nn.functional.cross_entropy(model(x), y).item()
    for fresh in (True, False):
        m = make_method("augment", {"sigma": 0.5, "folds": 5, "fresh_noise": fresh})
        m.prepare(16, x.shape[1:], _gen())
        assert m.objective(model, x, y, _gen(3)).total.item() == pytest.approx(clean, rel=1e-6)


def test_randsign_flips_magnitude_with_probability_p():
    x = torch.rand(200_000) + 0.1
    out = random_sign(x, 0.1, 0.8, _gen())
    up = torch.isclose(out, x * 1.1)
    down = torch.isclose(out, x * 0.9)
    assert (up | down).all()
    assert abs(up.float().mean().item() - 0.8) < 0.01
    neg = -x
    assert torch.allclose(random_sign(neg, 0.1, 1.0, _gen()), neg * 0.9)  # x + eps x sign(x) = x + eps|x|


@pytest.mark.parametrize("where", ["input", "hidden", "both"])
def test_randsign_loss_is_random_in_training_only(where):
    torch.manual_seed(0)
    model = build_model("mlp", "synthetic")
    m = make_method("randsign", {"eps": 0.5, "where": where})
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    a, b = m.loss(model, x, y, _gen(1)).total, m.loss(model, x, y, _gen(2)).total
    assert a.item() != b.item()
    clean = torch.nn.functional.cross_entropy(model(x), y)
    assert m.objective(model, x, y, _gen(1)).total.item() == pytest.approx(clean.item())


def test_fgsm_adversarial_term():
    torch.manual_seed(0)
    model = build_model("mlp", "synthetic")
    m = make_method("fgsm", {"eps": 0.1})
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    L = m.loss(model, x, y, _gen())
    assert L.terms["adv"].item() > L.terms["ce"].item()  # the attack raises the loss
    assert L.total.item() == pytest.approx(0.5 * L.terms["ce"].item() + 0.5 * L.terms["adv"].item())
    L.total.backward()
    assert model.first.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method,params,key", [
    ("augment", {"sigma": 0.1}, "folds"),
    ("augment", {"sigma": 0.1, "folds": 0}, "folds"),
    ("augment", {"sigmas": 0.1, "folds": 2}, "sigmas"),
    ("regularizer", {"sigma": -1, "alpha": 1}, "sigma"),
    ("regularizer", {"sigma": 1, "alpha": -0.5}, "alpha"),
    ("regularizer", {"sigma": "big", "alpha": 1}, "sigma"),
    ("fgsm", {"eps": -0.1}, "eps"),
    ("randsign", {"eps": 0.1, "where": "output"}, "where"),
    ("nope", {}, "method"),
])
def test_bad_params_name_the_key(method, params, key):
    """As a spec reports them: params.<key>, or method for an unknown method."""
    with pytest.raises(SpecError) as e:
        check_params(method, params)
    assert e.value.key == (key if key == "method" else f"params.{key}") and key in str(e.value)


def test_params_get_defaults_and_ints_become_floats():
    assert check_params("regularizer", {"sigma": 1, "alpha": 2}) == {"sigma": 1.0, "alpha": 2.0, "depth": 1,
                                                                      "sigma_units": "pixel"}
    assert check_params("randsign", {"eps": 0.1}) == {"eps": 0.1, "p": 0.5, "where": "input"}


def test_certify_defaults_to_the_methods_own_training_noise_level():
    """A method declares which parameter is its Gaussian training noise (noise_param);
    certification defaults to that sigma, else to 0.25 (randsign's eps is not a sigma)."""
    from gaussreg.runs.spec import CERTIFY_SIGMA, default_certify_sigma
    assert {n for n, c in METHOD_CLASSES.items() if c.noise_param} == {"augment", "regularizer", "consistency",
                                                                       "stability"}
    assert default_certify_sigma({"method": "regularizer", "params": {"sigma": 0.5, "alpha": 1.0}}) == 0.5
    assert default_certify_sigma({"method": "augment", "params": {"sigma": 0.1, "folds": 2}}) == 0.1
    assert default_certify_sigma({"method": "randsign", "params": {"eps": 0.3}}) == CERTIFY_SIGMA == 0.25
    assert default_certify_sigma({"method": "baseline", "params": {}}) == 0.25
    assert default_certify_sigma({"method": "regularizer", "params": {"sigma": 0.0}}) == 0.25  # no noise: no sigma
