"""Datasets: the catalogue (datasets, torch-free), loading them to tensors (loading), and
making them available offline (download). Below the science: models ask the catalogue for a
dataset's shape."""
