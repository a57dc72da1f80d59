"""Config fields that describe each decoder layer, rebuilt for the layers a merge outputs.

Hybrid architectures list one entry per layer (Gemma 3's ``layer_types``: sliding or full
attention; SmolLM3's ``no_rope_layers``; Falcon-H1's ``layers_block_type``) or the indices of
the layers of one kind (Qwen-MoE's ``mlp_only_layers``). A frankenmerge (passthrough slices)
reorders and repeats layers: output layer ``i`` must get the entry of the source layer it is
built from, or transformers regenerates a default pattern (right only when every slice starts
at a multiple of the pattern's period). mergekit 0.1.5 fails on such a recipe under
transformers 5 ("num_hidden_layers (24) must be equal to the number of layer_types (18)").
"""

from __future__ import annotations

import copy

# Names as transformers / mlx-lm configs spell them (architecture knowledge is data).
PER_LAYER_FIELDS = (
    "layer_types", "mlp_layer_types", "layers_block_type", "no_rope_layers", "is_moe_layer",
    "num_attention_heads_per_layer", "block_types", "layer_rope_theta",
    "activation_sparsity_pattern",
)  # fmt: skip
LAYER_INDEX_FIELDS = ("mlp_only_layers",)


def layers_config(config: dict) -> dict:
    """The part of ``config`` that describes the decoder layers (``text_config`` for multimodal
    configs without their own ``num_hidden_layers``), as ``io.model_folder.patch_config`` reads it."""
    text = config.get("text_config")
    if isinstance(text, dict) and "num_hidden_layers" not in config:
        return text
    return config


def sliced_layer_fields(
    config: dict, sources: list[tuple[dict, int, int]]
) -> tuple[dict, list[str]]:
    """``config`` with its per-layer fields rebuilt for output layers taken from ``sources``.

    ``sources[i]`` is (source config, its layer count, source layer index) of output layer ``i``.
    A field some source lacks, or holds with the wrong length, is dropped (transformers then
    derives its default). Returns the new config and warnings (mlx-lm's Gemma 3 derives its
    attention pattern from ``sliding_window_pattern`` alone, so a sliced pattern that breaks the
    period runs as transformers reads it but not in mlx-lm).
    """
    out = copy.deepcopy(config)
    target = layers_config(out)
    warnings: list[str] = []
    for key in PER_LAYER_FIELDS:
        if key not in target:
            continue
        values = []
        for cfg, n, j in sources:
            own = layers_config(cfg).get(key)
            if not isinstance(own, list) or len(own) != n:
                target.pop(key)
                warnings.append(
                    f"config field {key} is not one entry per layer in every source; dropped"
                )
                break
            values.append(own[j])
        else:
            target[key] = values
    for key in LAYER_INDEX_FIELDS:
        if isinstance(target.get(key), list):
            target[key] = [
                i for i, (cfg, _, j) in enumerate(sources)
                if j in (layers_config(cfg).get(key) or [])
            ]  # fmt: skip
    period = target.get("sliding_window_pattern")
    kinds = target.get("layer_types")
    if isinstance(period, int) and period > 0 and isinstance(kinds, list):
        implied = ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
                   for i in range(len(kinds))]  # fmt: skip
        if kinds != implied:
            warnings.append(
                f"the output's layer_types are not a period-{period} pattern: transformers runs "
                f"them as written, mlx-lm (which reads sliding_window_pattern) does not"
            )
    return out, warnings
