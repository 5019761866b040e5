"""gaussreg: train networks robust to Gaussian input noise with the analytic moment
regularizer, and compare them fairly against noisy data augmentation."""

__version__ = "0.1.0"
