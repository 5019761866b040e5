"""A trained run's certificate: randomized-smoothing certification (gaussreg.science.smoothing)
of its model on test images spread over the test set, written to the run directory as
certify-<sigma>.json (gaussreg.runs.store)."""

from __future__ import annotations

from typing import Optional

import torch

from gaussreg.runs.store import BEST_CHECKPOINT, now_iso
from gaussreg.science.smoothing import (DEFAULT_ALPHA, DEFAULT_IMAGES, DEFAULT_N, DEFAULT_N0, certify_dataset,
                                        pick_images)


def certify_run(run, model, test_x, test_y, sigma: float, n0: int = DEFAULT_N0, n: int = DEFAULT_N,
                alpha: float = DEFAULT_ALPHA, images: Optional[int] = DEFAULT_IMAGES, batch: int = 1000,
                seed: int = 0, checkpoint: Optional[str] = None, should_stop=None, progress=None) -> Optional[dict]:
    """Certify `images` test images spread over the test set with the trained model and
    write run/certify-<sigma>.json atomically (through gaussreg.runs.store); returns its
    content, or None (nothing written) when should_stop() turned true. `checkpoint`
    names the certified model's file (default the run's best checkpoint)."""
    indices = pick_images(len(test_x), images)
    cert = certify_dataset(model, test_x, test_y, sigma, n0, n, alpha, batch, seed, indices, should_stop, progress)
    if cert is None:
        return None
    p = next(model.parameters(), None)
    cert.update(run_id=run.id, checkpoint=checkpoint or BEST_CHECKPOINT, test_images=len(test_x), created_at=now_iso(),
                device=str(p.device if p is not None else "cpu"), torch=torch.__version__)
    run.write_certification(cert)
    return cert
