"""The maths, with the paper's names: Gaussian moments (moments), their propagation (adf), the
regularizer (Eq. 1-5), models, training methods, robustness R (Sec. 4.1) and certification
(smoothing). Knows nothing of run directories."""
