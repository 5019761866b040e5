"""Training methods, each its parameters (names, types, ranges, defaults) and a loss on a
batch: baseline, augment, regularizer, randsign, fgsm, consistency, stability. Adding a
method is adding a class here and listing it in METHOD_CLASSES (a colour in
gaussreg.views.style and gaussreg.views.plot is optional).

torch is imported inside the functions: specs and manifests check a method's parameters
through the classes here, and reading them must start without torch.

Noise is in [0,1] pixel units and drawn on the batch's device from the run's
generator, so a run is reproducible from its seed and never syncs the host. With
sigma_units = "reference", augment's and the regularizer's sigma is in the reference
code's units (gaussreg.science.units): a per-channel pixel sigma from the dataset's mean and std."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Dict, NamedTuple, Optional

from gaussreg.core.schema import Param, SpecError
from gaussreg.core.schema import check_params as _check
from gaussreg.core.schema import nonneg
from gaussreg.science import units

if TYPE_CHECKING:
    import torch  # here: specs and manifests read methods without torch


class Loss(NamedTuple):
    total: torch.Tensor
    terms: Dict[str, torch.Tensor]  # the named parts of the objective, for logging
    logits: Optional[torch.Tensor]  # clean logits when the method computes them


def _cross_entropy(logits, y):
    import torch.nn.functional as F  # here: specs and manifests read methods without torch
    return F.cross_entropy(logits, y)


class Method:
    """What a training method is: its parameters (`schema`), the epoch's items (`copies`,
    `batch`) and its loss. The defaults are clean training; each method changes some."""

    name = ""  # as a spec names it
    schema: Dict[str, Param] = {}  # the parameters a spec gives this method
    copies = 1  # items per clean training image in one epoch
    term_names = ("ce",)  # the keys of Loss.terms, in the order the worker logs them
    noise_param = None  # the parameter that is a Gaussian training noise level, if any (certify's default sigma)
    # whether the loss needs the model split as rest(act(first(x))) (gaussreg.science.models.GaussNet);
    # other methods train any module, e.g. a ViT, whose stem has no elementwise activation
    needs_split = False

    # the per-channel pixel sigma that sigma stands for in the reference's units (gaussreg.science.units)
    reference_units = None

    def __init__(self, **params):
        self.params = self.check(params)
        # per channel, in pixel units, when sigma is in the reference's: the worker sets it
        # from the spec's pixel_sigma, else from the loaded dataset's mean and std
        self.pixel_sigma: Optional[tuple] = None

    @classmethod
    def reference_sigma(cls, params: dict, dataset: str, mean, std) -> Optional[list]:
        """The per-channel training noise in pixel units that params' sigma stands for when
        params.sigma_units is "reference", from the dataset's per-channel mean and std (the
        reference's own on MNIST, gaussreg.science.units.reference_stats); None in pixel units."""
        if params.get("sigma_units", "pixel") != "reference":
            return None
        m, s = units.reference_stats(dataset, mean, std)
        return list(cls.reference_units(params["sigma"], m, s))

    def noise_sigma(self):
        """The training noise as it is drawn: the float sigma in pixel units, or a tuple of
        per-channel pixel sigmas in the reference's units."""
        if self.params.get("sigma_units", "pixel") == "pixel":
            return self.params["sigma"]
        if self.pixel_sigma is None:  # never train the reference's levels in pixel units by mistake
            raise RuntimeError(f"method {self.name!r} has sigma_units = 'reference' but no per-channel sigma: "
                               "set its pixel_sigma from the dataset (reference_sigma)")
        return self.pixel_sigma

    @classmethod
    def check(cls, given: dict) -> dict:
        """The parameters with defaults filled in; SpecError names the bad key."""
        return _check(cls.name, cls.schema, given)

    @classmethod
    def spec_params(cls, given: dict) -> dict:
        """The parameters as a resolved spec stores them (see Param.omitted_at_default)."""
        out = cls.check(given)
        return {k: v for k, v in out.items() if not (cls.schema[k].omitted_at_default and v == cls.schema[k].default)}

    def prepare(self, n: int, image_shape, g: torch.Generator) -> None:
        """Called once per run with the training set size."""

    def batch(self, X, Y, idx, g: torch.Generator):
        return X[idx], Y[idx]

    def passes(self, n: int) -> Dict[str, int]:
        """The forward passes of one training epoch over n clean images, by kind (the run's
        cost in result.json): clean images, noisy ones (any perturbed input) and the
        regularizer's expected-activation passes. Here: each item of the epoch once, the
        first copy clean and the others noisy (augment's folds)."""
        return {"clean": n, "noisy": n * (self.copies - 1), "expected": 0}

    def clean_loss(self, model, x, y) -> Loss:
        logits = model(x)
        ce = _cross_entropy(logits, y)
        return Loss(ce, {"ce": ce}, logits)

    def loss(self, model, x, y, g: torch.Generator) -> Loss:
        return self.clean_loss(model, x, y)

    def objective(self, model, x, y, g: torch.Generator) -> Loss:
        """The validation objective: the training loss, minus training-only randomness."""
        return self.loss(model, x, y, g)


class Baseline(Method):
    """Clean training: the cross-entropy of the clean images."""

    name = "baseline"


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply, good avalanche) on int32 bit patterns;
    the masks turn the arithmetic right shifts into logical ones."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * (0x846CA68B - (1 << 32))
    return x ^ ((x >> 16) & 0xFFFF)


def _int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


@functools.lru_cache(maxsize=64)
def _seed_key(seed: int) -> int:
    """The seed's hash as a Python int, made on the CPU: a tensor made on the GPU per batch
    would be a blocking host-to-device copy."""
    import torch  # here: specs and manifests read methods without torch
    return int(_hash32(torch.tensor(_int32(seed), dtype=torch.int32)))


@functools.lru_cache(maxsize=16)
def channel_tensor(values: tuple, dtype, device) -> torch.Tensor:
    """Per-channel values as a (C, 1, 1) tensor on the device, made once per run: one made
    per batch would be a blocking host-to-device copy."""
    import torch  # here: specs and manifests read methods without torch
    return torch.tensor(values, dtype=dtype, device=device).view(-1, 1, 1)


# sigma in gaussreg's [0,1] pixel units or in the reference code's (gaussreg.science.units); added
# after run ids existed, so a spec in pixel units leaves it out and keeps its id
SIGMA_UNITS = Param(str, "pixel", lambda v: v in ("pixel", "reference"), "must be 'pixel' or 'reference'",
                    omitted_at_default=True)


BANK_VERSION = 2  # in the spec of every run whose noise comes from bank_noise; see Augment.spec_params


def _unit(h: torch.Tensor) -> torch.Tensor:
    """A uniform in (0, 1) from 23 bits of a hash: (2k + 1) / 2^24, an odd integer below
    2^24 times a power of two, so exact in float32 and never 0 or 1 (min 2^-24: |z| <= 5.77)."""
    import torch  # here: specs and manifests read methods without torch
    return (((h >> 9) & 0x7FFFFF) * 2 + 1).to(torch.float32) * 2.0 ** -24


def bank_noise(seed: int, item: torch.Tensor, shape) -> torch.Tensor:
    """N(0, 1) noise of shape (len(item), *shape) that is a function of (seed, item) alone:
    the fixed noise bank of a once-augmented dataset, computed per batch instead of held
    in memory (21 folds of CIFAR would take 5.8 GB in half precision). Items >= 0 are
    the fixed mode's (copy - 1) * n + image, items -1, -2, ... the shared mode's copies.

    A counter-based generator: each value is Box-Muller of two hashes of (seed, item,
    position), so it is the same whatever batch, order, device or resume point asks
    for it, and costs no host sync. Version 2 (BANK_VERSION): version 1 made u1 from
    float32(h1) + 2^31 + 1, which is 0 for h1 near -2^31 (float32 cannot hold 2^31 + 1),
    and -2 log 0 put +-inf into about one item in 10^5 of MNIST size (issue 29)."""
    import torch  # here: specs and manifests read methods without torch
    n = math.prod(shape)
    half = (n + 1) // 2
    key = _hash32(item.to(torch.int32) ^ _seed_key(seed))
    pos = torch.arange(half, dtype=torch.int64, device=item.device) * 0x9E3779B9 & 0xFFFFFFFF  # Weyl sequence
    pos = torch.where(pos >= 1 << 31, pos - (1 << 32), pos).to(torch.int32)
    h1 = _hash32(key[:, None] + pos)
    h2 = _hash32(h1 ^ 0x68E31DA4)
    r = torch.sqrt(-2.0 * torch.log(_unit(h1)))
    theta = _unit(h2) * (2 * math.pi)
    return torch.cat([r * torch.cos(theta), r * torch.sin(theta)], 1)[:, :n].reshape(len(item), *shape)


NOISE_MODES = ("fresh", "fixed", "shared")


class Augment(Method):
    """N-fold Gaussian data augmentation: each epoch holds every clean image plus
    `folds` noisy copies x + sigma z, shuffled together; the epoch costs (folds + 1) clean
    epochs (the paper's N~ = folds + 1). `noise` says where z comes from:

    - "fresh" (the default): new noise every epoch, independent per image and copy. Not
      the reference's: its dataset is augmented once.
    - "fixed": a once-augmented dataset with independent noise per image and copy: copy k
      of image i always carries the same noise, a function of (seed, k, i) (`bank_noise`).
      Not the reference's either: it shares one noise tensor per copy (below).
    - "shared": the reference's, one noise tensor per copy shared by every image of it:
      main.py, `Augmented.__getitem__`, `with gnm.utils.rand.RNG(seed + offset, ...):
      new_image = torch.randn_like(image).mul_(sigma).add_(image)` reseeds its generator
      to the same value for every image of copy `offset`, so N~ = 21 is 20 noise patterns.
      Here copy k's pattern is bank item -k of the run's seed, so it depends on (seed, k)
      alone (the reference's seed is a random draw per run, so runs do not share patterns
      either), and is the same on any device, in any batch order and after a resume.

    `fresh_noise = true/false` is the old spelling of "fresh"/"fixed". The validation
    objective is the clean cross-entropy, as in the reference code, so the LR schedule,
    early stopping and the best checkpoint follow clean validation loss for every method
    but the regularizer.

    sigma_units = "reference": the reference adds sigma N(0, 1) to the normalised image,
    so channel c gets sigma std_c pixels (gaussreg.science.units.augment_sigma)."""

    name = "augment"
    noise_param = "sigma"
    schema = {"sigma": nonneg(float), "folds": Param(int, ok=lambda v: v >= 1, why="must be >= 1"),
              "noise": Param(str, "fresh", lambda v: v in NOISE_MODES, "must be 'fresh', 'fixed' or 'shared'"),
              "fresh_noise": Param(bool, True),  # the old spelling of noise = "fresh" (true) / "fixed" (false)
              # the version of bank_noise a fixed or shared run draws from; planned, not chosen
              "bank": Param(int, BANK_VERSION, lambda v: v == BANK_VERSION,
                            f"must be {BANK_VERSION}, the version of the noise bank this gaussreg computes"),
              "sigma_units": SIGMA_UNITS}
    reference_units = staticmethod(units.augment_sigma)

    @classmethod
    def check(cls, given):
        out = super().check(given)
        old = "fresh" if out["fresh_noise"] else "fixed"
        if "noise" in given and "fresh_noise" in given and out["noise"] != old:
            raise SpecError("params.noise", f"parameters 'noise' and 'fresh_noise' of method 'augment' disagree: "
                            f"fresh_noise = {str(out['fresh_noise']).lower()} is the old spelling of noise = "
                            f"{old!r}, not {out['noise']!r}; give noise alone")
        mode = out["noise"] if "noise" in given else old
        if "bank" in given and mode == "fresh":
            raise SpecError("params.bank", "parameter 'bank' of method 'augment' is the noise bank of noise = "
                            "'fixed' or 'shared'; fresh noise draws from none")
        out["noise"], out["fresh_noise"] = mode, mode == "fresh"
        return out

    @classmethod
    def spec_params(cls, given):
        """sigma and folds, then: fresh noise as `fresh_noise = true`, the spelling its run
        ids were made with before `noise` existed (so they stay); fixed and shared noise as
        `noise` and the bank's version, so runs of bank version 1 (fresh_noise = false
        before issue 29) and of any later bank are other runs with other ids."""
        p = cls.check(given)
        out = {"sigma": p["sigma"], "folds": p["folds"]}
        if p["sigma_units"] != "pixel":  # left out in pixel units, so those ids stay
            out["sigma_units"] = p["sigma_units"]
        if p["noise"] == "fresh":
            return {**out, "fresh_noise": True}
        return {**out, "noise": p["noise"], "bank": BANK_VERSION}

    def __init__(self, **params):
        super().__init__(**params)
        self.copies = self.params["folds"] + 1
        self.bank_seed: Optional[int] = None
        self.shared = None  # (folds, *image_shape): the shared mode's one pattern per noisy copy

    def prepare(self, n, image_shape, g):
        self.n = n
        if self.params["noise"] != "fresh":
            self.bank_seed = int(g.initial_seed())
        if self.params["noise"] == "shared":
            import torch  # here: specs and manifests read methods without torch
            copies = -torch.arange(1, self.params["folds"] + 1, device=g.device)
            self.shared = bank_noise(self.bank_seed, copies, tuple(image_shape))

    def batch(self, X, Y, idx, g):
        example, copy = idx % len(X), idx // len(X)
        x = X[example]
        noisy = (copy > 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        if self.shared is not None:
            z = self.shared[(copy - 1).clamp_min(0)].to(x.dtype)
        elif self.bank_seed is not None:
            # item (copy - 1) * n + i: one noise vector per noisy copy of each image
            z = bank_noise(self.bank_seed, (copy - 1).clamp_min(0) * len(X) + example, x.shape[1:]).to(x.dtype)
        else:
            import torch  # here: specs and manifests read methods without torch
            z = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        sigma = self.noise_sigma()
        if isinstance(sigma, tuple):
            sigma = channel_tensor(sigma, x.dtype, x.device)
        return x + sigma * noisy * z, Y[example]

    def objective(self, model, x, y, g):
        return self.clean_loss(model, x, y)


class Regularizer(Method):
    """CE(f(x), y) + alpha CE(rest_k(mu_k), y) (Eq. 3; depth k = 1 is the paper).

    sigma_units = "reference": the reference passes the variance sigma^2 / R^2 through the
    first layer on normalised images, so channel c gets sigma std_c / R pixels
    (gaussreg.science.units.regularizer_sigma); Eq. 5 maps per-channel variances through the
    squared weights, sigma2^2 = sum_c (A_c . A_c) sigma_c^2."""

    name = "regularizer"
    noise_param = "sigma"
    schema = {"sigma": nonneg(float), "alpha": nonneg(float),
              # where the moments stop being propagated (gaussreg.science.adf): 1 = the paper
              "depth": Param((int, str), 1, lambda v: v == "all" or (isinstance(v, int) and v >= 1),
                             "must be an integer >= 1 or 'all'", omitted_at_default=True),
              "sigma_units": SIGMA_UNITS}
    term_names = ("ce", "reg")
    reference_units = staticmethod(units.regularizer_sigma)
    needs_split = True

    def passes(self, n):
        # rest_k runs on the clean activations and on mu_k (alpha = 0 included)
        return {"clean": n, "noisy": 0, "expected": n}

    def loss(self, model, x, y, g):
        from gaussreg.science.regularizer import moment_loss  # here: the regularizer imports torch
        m = moment_loss(model, x, y, self.noise_sigma(), self.params["alpha"], self.params["depth"])
        return Loss(m.total, {"ce": m.ce, "reg": m.reg}, m.logits)


def random_sign(x, eps: float, p: float, g) -> torch.Tensor:
    """g(x) = x + eps x l(x), l(x) = sign(x) w.p. p, else -sign(x); x l(x) = +-|x|."""
    import torch  # here: specs and manifests read methods without torch
    s = torch.where(torch.rand(x.shape, generator=g, device=x.device) < p, 1.0, -1.0).to(x.dtype)
    return x + eps * x.abs() * s


class RandSign(Method):
    """The seed paper's random sign perturbation, on the input, the first hidden
    layer, or both; training only (validation and test see the clean network)."""

    name = "randsign"
    schema = {"eps": nonneg(float), "p": Param(float, 0.5, lambda v: 0 <= v <= 1, "must be in [0, 1]"),
              "where": Param(str, "input", lambda v: v in ("input", "hidden", "both"),
                             "must be 'input', 'hidden' or 'both'")}

    @property
    def needs_split(self):  # the hidden layer it perturbs is the first activation's output
        return self.params["where"] != "input"

    def passes(self, n):
        return {"clean": 0, "noisy": n, "expected": 0}  # one perturbed pass (input or hidden layer)

    def loss(self, model, x, y, g):
        eps, p, where = self.params["eps"], self.params["p"], self.params["where"]
        if where in ("input", "both"):
            x = random_sign(x, eps, p, g)
        if where == "input":
            logits = model(x)
        else:
            logits = model.rest(random_sign(model.act(model.first(x)), eps, p, g))
        ce = _cross_entropy(logits, y)
        return Loss(ce, {"ce": ce}, logits)

    def objective(self, model, x, y, g):
        return self.clean_loss(model, x, y)


class FGSM(Method):
    """FGSM adversarial training: 0.5 CE(x) + 0.5 CE(clamp(x + eps sign(grad_x CE), 0, 1))."""

    name = "fgsm"
    schema = {"eps": nonneg(float)}
    term_names = ("ce", "adv")

    def passes(self, n):
        # the clean pass (which also gives the input gradient) and the adversarial one
        return {"clean": n, "noisy": n, "expected": 0}

    def loss(self, model, x, y, g):
        import torch  # here: specs and manifests read methods without torch
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            logits = model(x)
            ce = _cross_entropy(logits, y)
            # the clean graph is reused for the training step, so keep it
            (grad,) = torch.autograd.grad(ce, x, retain_graph=True)
            x_adv = (x + self.params["eps"] * grad.sign()).clamp(0, 1).detach()
            adv = _cross_entropy(model(x_adv), y)
        return Loss(0.5 * ce + 0.5 * adv, {"ce": ce, "adv": adv}, logits)


def _fresh_noise(x, sigma: float, g) -> torch.Tensor:
    """x + sigma z, z ~ N(0, I) in pixel units from the run's generator (augment's fresh noise)."""
    import torch  # here: specs and manifests read methods without torch
    return x + sigma * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def _log_probs(logits) -> torch.Tensor:
    """log softmax in at least float32: under bf16 autocast the logits are bf16, and the KL
    and entropy terms below are differences of nearly equal logs."""
    import torch  # here: specs and manifests read methods without torch
    import torch.nn.functional as F
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


class Consistency(Method):
    """Consistency regularization (Jeong and Shin, NeurIPS 2020, in the default form of
    their code): m noisy copies x + sigma z_i of each image, p_i = softmax(f(x + sigma z_i)),
    p_bar = mean_i p_i;

        loss = mean_i CE(f(x + sigma z_i), y) + lbd mean_i KL(p_bar || p_i) + eta H(p_bar)

    (their `consistency_loss(loss='default')`: gradients flow through p_bar too). Every
    image of a batch gets its m copies, so a step sees batch_size clean images and costs m
    noisy forward passes each (their code splits each batch into m chunks instead, so a
    step sees batch_size / m images). Defaults are theirs: lbd = 10 and eta = 0.5 their
    script's, m = 2 that of every Gaussian run of theirs; their MNIST runs use lbd 10 at
    sigma 0.25 and 5 at 0.5 and 1, their CIFAR-10 runs lbd in {5, 10, 20}. Noise is in
    pixel units, fresh per step."""

    name = "consistency"
    noise_param = "sigma"
    schema = {"sigma": nonneg(float), "m": Param(int, 2, lambda v: v >= 1, "must be >= 1"),
              "lbd": nonneg(float, 10.0), "eta": nonneg(float, 0.5)}
    term_names = ("ce", "kl", "entropy")

    def passes(self, n):
        return {"clean": 0, "noisy": n * self.params["m"], "expected": 0}

    def loss(self, model, x, y, g):
        import torch  # here: specs and manifests read methods without torch
        m, sigma = self.params["m"], self.params["sigma"]
        noisy = torch.cat([_fresh_noise(x, sigma, g) for _ in range(m)])  # copy i is rows i*B..(i+1)*B
        logits = model(noisy)
        ce = _cross_entropy(logits, y.repeat(m))  # the mean over copies and images
        logp = _log_probs(logits).view(m, len(x), -1)
        p_bar = logp.exp().mean(0)
        log_p_bar = torch.log(p_bar.clamp_min(1e-20))  # p_bar underflows to 0 where every copy's does
        kl = (p_bar * (log_p_bar - logp)).sum(-1).mean()  # mean over copies and images of KL(p_bar || p_i)
        entropy = -(p_bar * log_p_bar).sum(-1).mean()
        total = ce + self.params["lbd"] * kl + self.params["eta"] * entropy
        # the first copy's logits: the epoch's train accuracy is on noisy images, as augment's and randsign's
        return Loss(total, {"ce": ce, "kl": kl, "entropy": entropy}, logits[:len(x)])

    def objective(self, model, x, y, g):
        return self.clean_loss(model, x, y)


class Stability(Method):
    """Stability training (Zheng, Song, Leung and Goodfellow, CVPR 2016) with the KL
    stability loss of their classification task:

        loss = CE(f(x), y) + alpha KL(p(x) || p(x + sigma z)),  z ~ N(0, I)

    with gradients through both passes (one clean, one noisy: two forward passes per
    image). sigma is in pixel units, fresh per step; alpha defaults to a small 0.01 (they
    stabilised against small distortions); at the noise levels of this comparison larger
    alphas are worth a grid (experiments/paper-lenet.toml: up to 2, the weight of the
    stability baseline in Jeong and Shin's MNIST runs, whose `train_stab.py` takes the
    cross-entropy to the clean softmax instead of the KL)."""

    name = "stability"
    noise_param = "sigma"
    schema = {"sigma": nonneg(float), "alpha": nonneg(float, 0.01)}
    term_names = ("ce", "stab")

    def passes(self, n):
        return {"clean": n, "noisy": n, "expected": 0}

    def loss(self, model, x, y, g):
        logits = model(x)
        ce = _cross_entropy(logits, y)
        logp = _log_probs(logits)
        logq = _log_probs(model(_fresh_noise(x, self.params["sigma"], g)))
        stab = (logp.exp() * (logp - logq)).sum(-1).mean()  # KL(p(x) || p(x + n)), mean over images
        return Loss(ce + self.params["alpha"] * stab, {"ce": ce, "stab": stab}, logits)

    def objective(self, model, x, y, g):
        return self.clean_loss(model, x, y)


METHOD_CLASSES = {cls.name: cls for cls in (Baseline, Augment, Regularizer, RandSign, FGSM, Consistency, Stability)}


def method_class(name: str) -> type:
    """The class of a method name; SpecError (key `method`) for an unknown one."""
    if name not in METHOD_CLASSES:
        raise SpecError("method", f"unknown method {name!r}; known: {', '.join(METHOD_CLASSES)}")
    return METHOD_CLASSES[name]


def check_params(name: str, params: dict) -> dict:
    """The method's parameters with defaults filled in; SpecError names the bad key."""
    return method_class(name).check(params)


def make_method(name: str, params: dict) -> Method:
    return method_class(name)(**params)
