"""Merge methods: pure float32 functions ``(tensors, base, *, params) -> mx.array``.

The table of names, parameters and defaults is ``mlxmerge.merge.registry.METHODS``.
"""

from mlxmerge.merge.methods.fusion import arcee_fusion, ram, ramplus_tl
from mlxmerge.merge.methods.linear import linear, nearswap, passthrough
from mlxmerge.merge.methods.model_stock import model_stock
from mlxmerge.merge.methods.sparsify import derive_key
from mlxmerge.merge.methods.spherical import karcher, multislerp, nuslerp, slerp
from mlxmerge.merge.methods.task_arithmetic import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    generalized_task_arithmetic,
    sce,
    task_arithmetic,
    ties,
)

__all__ = [
    "arcee_fusion",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "derive_key",
    "generalized_task_arithmetic",
    "karcher",
    "linear",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "passthrough",
    "ram",
    "ramplus_tl",
    "sce",
    "slerp",
    "task_arithmetic",
    "ties",
]
