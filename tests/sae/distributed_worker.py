"""Run by test_distributed under ``mlx.launch``: train on toy data, save this rank's parameters."""

import sys

# isort: off
import mlxmerge  # noqa: F401  (loads the optimized BLAS before mlx.core)
import mlx.core as mx

# isort: on
import numpy as np

from mlxmerge.demo.toy_sae import ToyData
from mlxmerge.sae.train import TrainConfig, train_sae

out = sys.argv[1]
tc = TrainConfig(k=4, expansion=4, tokens=256 * 12, batch_size=256, lr=3e-3, dead_tokens=256,
                 log_every=4, seed=3)  # fmt: skip
r = train_sae(ToyData(d_in=16, n_features=12, mean_active=2.0, seed=1), tc)
rank = mx.distributed.init().rank()
np.savez(f"{out}/rank{rank}.npz", **{k: np.array(v) for k, v in r.params.items()},
         fired=r.feature_density, auxk=np.array([h["auxk"] for h in r.history]))  # fmt: skip
