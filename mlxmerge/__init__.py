"""mlxmerge: merge, abliterate and dissect open-weight LLMs with MLX.

The public verbs are importable from here; each is loaded on first use, so ``import mlxmerge``
stays cheap (and loads OpenBLAS before anything imports ``mlx.core``).
"""

import importlib

from mlxmerge._blas import load_optimized_blas

# Must run before anything imports mlx.core.
load_optimized_blas()

__version__ = "0.1.0"

# These share their name with a module (mlxmerge/merge/, mlxmerge/convert.py,
# mlxmerge/abliterate/), so they are bound eagerly: the function then wins over the submodule
# attribute for good. (Cheap: none of them imports mlx-lm at import time.)
from mlxmerge.abliterate.pipeline import abliterate
from mlxmerge.convert import convert
from mlxmerge.merge.runner import merge

# public name → module that defines it
_VERBS = {
    "open_checkpoint": "mlxmerge.io",
    "write_model": "mlxmerge.io",
    "inspect_model": "mlxmerge.inspect",
    "plan_merge": "mlxmerge.merge.plan",
    "parse_recipe": "mlxmerge.merge.recipe",
    "diff_models": "mlxmerge.merge.diagnostics",
    "soup": "mlxmerge.merge.soup",
    "moe": "mlxmerge.merge.moe",
    "extract_lora": "mlxmerge.lora",
    "open_adapter": "mlxmerge.lora",
    "evaluate": "mlxmerge.eval.scoring",
    "orthogonalize_model": "mlxmerge.abliterate",
    "refusals": "mlxmerge.abliterate",
    "collect": "mlxmerge.sae",
    "train_sae": "mlxmerge.sae.pipeline",
    "evaluate_sae": "mlxmerge.sae",
    "feature_report": "mlxmerge.sae",
    "steer": "mlxmerge.sae",
    "load_sae": "mlxmerge.sae",
    "save_sae": "mlxmerge.sae",
    "ablate_features": "mlxmerge.sae",
    "run_demo": "mlxmerge.demo",
}

__all__ = [  # noqa: PLE0604 (the lazy verbs are listed from _VERBS)
    "__version__", "abliterate", "convert", "merge", *_VERBS,
]  # fmt: skip


def __getattr__(name: str):
    if name not in _VERBS:
        raise AttributeError(f"module 'mlxmerge' has no attribute {name!r}")
    # ``train_sae`` here is the folder-level verb (``mlxmerge.sae.pipeline.train``).
    attr = "train" if name == "train_sae" else name
    return getattr(importlib.import_module(_VERBS[name]), attr)
