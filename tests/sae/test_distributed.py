"""Data-parallel training over 2 local processes (ring backend) matches one process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("distributed_worker.py")


@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch not installed")
def test_two_processes_train_the_same_sae_as_one(tmp_path):
    single = tmp_path / "single"
    multi = tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    subprocess.run([sys.executable, str(WORKER), str(single)], check=True, timeout=300)
    subprocess.run(["mlx.launch", "-n", "2", "--backend", "ring", sys.executable, str(WORKER), str(multi)],
                   check=True, timeout=300)  # fmt: skip
    one = np.load(single / "rank0.npz")
    r0, r1 = np.load(multi / "rank0.npz"), np.load(multi / "rank1.npz")
    assert one["auxk"].max() > 0  # AuxK was active, so its all-reduced normaliser is exercised
    for name in ("encoder", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_array_equal(r0[name], r1[name])  # ranks stay in lock step
        np.testing.assert_allclose(r0[name], one[name], rtol=1e-3, atol=1e-4)
