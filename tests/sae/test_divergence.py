"""SAE training stops at the first non-finite loss, naming the step and the likely causes."""

import numpy as np
import pytest

from mlxmerge.sae.activations import ArraySource
from mlxmerge.sae.model import SAEError
from mlxmerge.sae.train import TrainConfig, train_sae


def test_non_finite_activations_stop_training_at_the_step():
    acts = np.random.default_rng(0).normal(size=(256, 16)).astype(np.float32)
    acts[200:] = np.inf  # an overflowed layer: some batches hold Inf
    tc = TrainConfig(k=4, expansion=2, tokens=32 * 40, batch_size=32, init_samples=32, seed=0)
    with pytest.raises(
        SAEError, match=r"diverged at step \d+: the loss is (nan|inf).*learning rate.*input scale"
    ):
        train_sae(ArraySource(acts), tc)


def test_finite_activations_train_to_the_end():
    acts = np.random.default_rng(0).normal(size=(256, 16)).astype(np.float32)
    tc = TrainConfig(k=4, expansion=2, tokens=32 * 5, batch_size=32, init_samples=32, log_every=5)
    assert train_sae(ArraySource(acts), tc).history[-1]["step"] == 5
