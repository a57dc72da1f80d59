"""Reconstruction and sparsity metrics, with the definitions spelled out (they differ between tools).

* ``fvu`` = Σ_n ‖x_n - x̂_n‖² / Σ_n ‖x_n - μ‖², μ the mean over the whole evaluation set; the
  numerator and denominator are summed separately. ``explained_variance`` = 1 - fvu.
* ``explained_variance_legacy`` = mean_n (1 - ‖x_n - x̂_n‖² / ‖x_n - μ‖²), the per-token ratio
  that SAEBench and Neuronpedia report.
* ``l0`` = mean number of non-zero latents per token; ``dead`` = latents that never exceed 1e-3
  on the data, ``dense`` = latents active on more than 10% of tokens.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlxmerge.sae.model import decode, encode

FVU_FORMULA = (
    "FVU = sum_n ||x_n - xhat_n||^2 / sum_n ||x_n - mean(x)||^2 (mean over all eval tokens)"
)


class ReconstructionStats:
    """Accumulates sums over batches in float64 so long evaluations stay exact enough."""

    def __init__(self, d_in: int, d_sae: int):
        self.n = 0
        self.sum_x = np.zeros(d_in)
        self.sum_xx = 0.0
        self.sum_err = 0.0
        self.legacy = 0.0
        self.l0 = 0.0
        self.fired = np.zeros(d_sae)
        self._batches = []  # per-token (err, ‖x‖², x) sums to centre the legacy ratio at the end

    def add(self, x: mx.array, x_hat: mx.array, z: mx.array) -> None:
        x64 = np.asarray(x, dtype=np.float64)
        err = np.asarray(((x - x_hat) ** 2).sum(axis=-1), dtype=np.float64)
        self.n += x64.shape[0]
        self.sum_x += x64.sum(axis=0)
        self.sum_xx += float((x64**2).sum())
        self.sum_err += float(err.sum())
        self.l0 += float((z > 0).sum().item())
        self.fired += np.asarray((z > 1e-3).sum(axis=0), dtype=np.float64)
        self._batches.append((err, x64))

    def result(self) -> dict:
        mu = self.sum_x / max(self.n, 1)
        total_var = self.sum_xx - self.n * float(mu @ mu)
        legacy = []
        for err, x64 in self._batches:
            legacy.append(1 - err / np.maximum(((x64 - mu) ** 2).sum(axis=-1), 1e-30))
        density = self.fired / max(self.n, 1)
        fvu = self.sum_err / max(total_var, 1e-30)
        return {
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "explained_variance_legacy": float(np.concatenate(legacy).mean()) if legacy else 0.0,
            "mse": self.sum_err / max(self.n, 1),
            "l0": self.l0 / max(self.n, 1),
            "dead_fraction": float((self.fired == 0).mean()),
            "dense_fraction": float((density > 0.1).mean()),
            "tokens": self.n,
        }


def reconstruction_metrics(cfg, params, x: np.ndarray, batch: int = 4096) -> dict:
    """FVU, EV (both kinds), L0 and dead/dense fractions of an SAE on activations ``x (n, d_in)``."""
    stats = ReconstructionStats(cfg.d_in, cfg.d_sae)
    for i in range(0, len(x), batch):
        xb = mx.array(x[i : i + batch])
        z = encode(params, cfg, xb)
        stats.add(xb, decode(params, z), z)
    return stats.result()


def fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Σ‖x - x̂‖² / Σ‖x - μ‖² over all rows (μ the mean row)."""
    x, x_hat = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum())


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def mmcs(ground_truth: np.ndarray, learned: np.ndarray) -> float:
    """Mean over *ground-truth* features of the best cosine with any learned direction (Sharkey)."""
    return float(cosine_matrix(ground_truth, learned).max(axis=1).mean())


def mcc(ground_truth: np.ndarray, learned: np.ndarray) -> float:
    """Mean |cos| of a one-to-one (Hungarian) matching of learned directions to ground truth."""
    from scipy.optimize import linear_sum_assignment

    c = np.abs(cosine_matrix(ground_truth, learned))
    rows, cols = linear_sum_assignment(-c)
    return float(c[rows, cols].mean())
