"""Ground-truth toy data (Sharkey et al. 2022, "Taking features out of superposition").

512 unit-norm Gaussian feature directions in 256 dims; feature i fires with probability
``p_i = 0.99^i · c`` with c chosen so that on average ``mean_active`` fire per sample (5), with a
coefficient drawn from U[0, 1]; a sample is the sum of its active features' coefficient · direction.
"""

from __future__ import annotations

import numpy as np


class ToyData:
    """An activation source: ``.batch(n, rng)`` draws fresh samples; ``.features`` is the truth."""

    fresh = True  # every draw is a new sample: held-out rows need no split (sae.heldout)

    def __init__(self, d_in: int = 256, n_features: int = 512, mean_active: float = 5.0,
                 decay: float = 0.99, seed: int = 0):  # fmt: skip
        rng = np.random.default_rng(seed)
        f = rng.standard_normal((n_features, d_in))
        self.features = (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)
        p = decay ** np.arange(n_features)
        self.probs = np.minimum(p * mean_active / p.sum(), 1.0)
        self.d_in = d_in

    def coefficients(self, n: int, rng: np.random.Generator) -> np.ndarray:
        on = rng.random((n, len(self.probs))) < self.probs
        return (on * rng.random(on.shape)).astype(np.float32)

    def batch(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.coefficients(n, rng) @ self.features

    sample = batch
