"""SAELens itself loads the folders mlxmerge writes and computes the same latents and outputs.

Skipped where ``sae_lens`` is not installed (it is not a dependency; a side venv with
``pip install sae-lens`` plus mlx runs it: ``PYTHONPATH=. python -m pytest tests/sae/test_saelens_interop.py``).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxmerge.demo.toy_sae import ToyData
from mlxmerge.sae.model import SAEConfig, decode, encode, init_params
from mlxmerge.sae.saelens import save_sae
from mlxmerge.sae.train import TrainConfig, train_sae

sae_lens = pytest.importorskip("sae_lens")
torch = pytest.importorskip("torch")


def _random(arch, rng, d_in=12, d_sae=48, k=5):
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k, hook_layer=2)
    p = init_params(cfg)
    for name in p:
        p[name] = mx.array(rng.standard_normal(p[name].shape).astype(np.float32))
    if arch == "jumprelu":
        p["threshold"] = mx.array(rng.uniform(0, 1, d_sae).astype(np.float32))
    return cfg, p


def _trained(arch):
    src = ToyData(d_in=12, n_features=24, mean_active=3.0, seed=0)
    tc = TrainConfig(k=3, expansion=4, architecture=arch, tokens=128 * 20, batch_size=128,
                     lr=3e-3, init_samples=1024, log_every=10)  # fmt: skip
    r = train_sae(src, tc, hook_layer=2)
    return r.cfg, r.params


CASES = {
    "topk": lambda rng: _random("topk", rng),
    "relu": lambda rng: _random("relu", rng),
    "jumprelu": lambda rng: _random("jumprelu", rng),
    "trained_jumprelu": lambda rng: _trained("jumprelu"),
    "trained_batchtopk": lambda rng: _trained("batchtopk"),
    "trained_matryoshka_batchtopk": lambda rng: _trained("matryoshka_batchtopk"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_saelens_loads_our_folder_with_equal_outputs(tmp_path, case):
    rng = np.random.default_rng(0)
    cfg, params = CASES[case](rng)
    save_sae(tmp_path / case, cfg, params)
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / case), device="cpu")
    x = (3 * rng.standard_normal((64, cfg.d_in))).astype(np.float32)
    with torch.no_grad():
        z_ref = sae.encode(torch.from_numpy(x)).numpy()
        out_ref = sae.decode(torch.from_numpy(z_ref)).numpy()
    z = np.array(encode(params, cfg, mx.array(x)))
    assert (z > 0).any()
    np.testing.assert_array_equal(z > 0, z_ref > 0)
    np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(decode(params, mx.array(z))), out_ref, rtol=1e-5, atol=1e-5)
