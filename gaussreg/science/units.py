"""The reference code's noise units, as per-channel noise levels in [0,1] pixel units.

gaussreg gives every noise level in [0,1] pixel units (the model normalises inside its
first layer). The reference code normalises the images first, z_c = (x_c - m_c) / s_c,
and on CIFAR its sigma means other things in other places. A noise of std t on the
normalised channel c is a noise of std t s_c on its pixels (x_c = m_c + s_c z_c), so:

- its regularizer passes the variance sigma^2 / R^2 through the first layer (Eq. 5) on
  normalised inputs, R = 2 (C - sum_c m_c) / sum_c s_c (its "input range"): channel c
  gets sigma s_c / R pixels (`regularizer_sigma`);
- its augmentation adds sigma N(0, 1) to the normalised image: sigma s_c pixels
  (`augment_sigma`);
- its test noise, sigma mean_c(1 / s_c) in normalised space, is sigma s_c mean(1 / s)
  pixels, within 5% of sigma on CIFAR: gaussreg's R keeps pixel units (README, "Units").

On MNIST the reference normalises with mean 0.5 and std 1 (`REFERENCE_NORMALISATION`):
R = 1 and all three are sigma, pixel units. On CIFAR its statistics are the ones gaussreg
normalises with (gaussreg.datasets); on a dataset the reference did not run, the formulas
take the dataset's own mean and std. Torch-free: specs are resolved without torch."""

from __future__ import annotations

from typing import Sequence, Tuple

# the reference's (mean, std) where they are not the ones gaussreg normalises the dataset with
REFERENCE_NORMALISATION = {"mnist": ((0.5,), (1.0,))}


def reference_stats(dataset: str, mean: Sequence[float], std: Sequence[float]) -> Tuple[tuple, tuple]:
    """The per-channel (mean, std) the reference normalises `dataset` with: its own where
    REFERENCE_NORMALISATION has them, else the dataset's."""
    return REFERENCE_NORMALISATION.get(dataset, (tuple(mean), tuple(std)))


def input_range(mean: Sequence[float], std: Sequence[float]) -> float:
    """The reference's R = 2 (C - sum_c m_c) / sum_c s_c, C the channel count."""
    r = 2 * (len(mean) - sum(mean)) / sum(std)
    if not r > 0:  # means of 1 (white images): the reference's formula has no noise level to give
        raise ValueError(f"the reference's input range 2 (C - sum of means) / sum of stds is {r:g} for mean "
                         f"{tuple(mean)} and std {tuple(std)}, not positive: train in pixel units")
    return r


def regularizer_sigma(sigma: float, mean: Sequence[float], std: Sequence[float]) -> tuple:
    """Per channel, the pixel std of the regularizer's variance sigma^2 / R^2 in
    normalised space: sigma s_c / R."""
    r = input_range(mean, std)
    return tuple(sigma * s / r for s in std)


def augment_sigma(sigma: float, mean: Sequence[float], std: Sequence[float]) -> tuple:
    """Per channel, the pixel std of sigma N(0, 1) added to the normalised image: sigma s_c."""
    return tuple(sigma * s for s in std)
