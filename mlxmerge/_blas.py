"""Load an optimized BLAS before MLX on Linux.

MLX's Linux CPU wheel links a reference BLAS (a 2048² fp32 matmul runs ~10-50x slower than
with OpenBLAS). Loading OpenBLAS with RTLD_GLOBAL before the first ``import mlx.core`` makes
the dynamic linker resolve MLX's BLAS symbols to it. Never done on macOS (Accelerate is used).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib/libopenblas.so.0",
)

#: What happened: path of the BLAS loaded, or why none was.
status: dict = {"loaded": None, "reason": "not attempted"}


def _candidates() -> list[str]:
    env = os.environ.get("MLXMERGE_BLAS")
    if env:
        return [env]
    arch = platform.machine()
    paths = [p.format(arch=arch) for p in _CANDIDATES]
    found = ctypes.util.find_library("openblas")
    if found:
        paths.append(found)
    return paths


def load_optimized_blas() -> dict:
    """Load OpenBLAS globally if on Linux, not disabled, and mlx is not yet imported."""
    if status["reason"] != "not attempted":
        return status
    if sys.platform != "linux":
        status["reason"] = "not Linux (MLX uses the platform's own BLAS)"
        return status
    if os.environ.get("MLXMERGE_NO_BLAS"):
        status["reason"] = "disabled by MLXMERGE_NO_BLAS"
        return status
    if "mlx.core" in sys.modules:
        status["reason"] = "mlx.core was imported before mlxmerge; too late to load OpenBLAS"
        return status
    for path in _candidates():
        if os.path.sep in path and not os.path.exists(path):
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        status.update(loaded=path, reason="loaded")
        return status
    status["reason"] = (
        "no OpenBLAS found (apt install libopenblas0-pthread); using MLX's reference BLAS"
    )
    return status
