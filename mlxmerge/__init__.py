"""mlxmerge: merge, abliterate and dissect open-weight LLMs with MLX."""

from mlxmerge._blas import load_optimized_blas

# Must run before anything imports mlx.core.
load_optimized_blas()

__version__ = "0.1.0"

__all__ = ["__version__"]
