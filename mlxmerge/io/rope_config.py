"""Config fields transformers 5 moved into ``rope_parameters``, put back where mlx-lm reads them.

transformers 5 saves the RoPE base, scaling and partial-rotary factor in one ``rope_parameters``
dict (``{"rope_theta": 100000.0, "rope_type": "default"}``), nested by layer type where layer
types differ (Gemma 3: ``{"full_attention": {...}, "sliding_attention": {...}}``), and writes no
top-level ``rope_theta`` / ``rope_scaling``. mlx-lm 0.32 reads only the top-level keys and
silently falls back to its defaults (a RoPE base of 10000): the model runs, wrongly. These
helpers fill the top-level keys from ``rope_parameters`` when absent; ``rope_parameters`` is
kept, and transformers 5 reads it first, so both libraries see one model.

Source: transformers ``modeling_rope_utils.py`` (``RopeParameters``, ``standardize_rope_params``).
"""

from __future__ import annotations

import copy

# Keys of a rope_parameters dict that are not scaling parameters.
_NOT_SCALING = ("rope_theta", "partial_rotary_factor")
# The layer types mlx-lm's per-layer RoPE reads: full attention's base is ``rope_theta``,
# sliding attention's ``rope_local_base_freq`` (Gemma 3).
_FULL, _SLIDING = "full_attention", "sliding_attention"
MLX_LM_KEYS = ("rope_theta", "rope_scaling", "partial_rotary_factor", "rope_local_base_freq")


def rope_fields(config: dict) -> dict:
    """The top-level fields mlx-lm reads that ``config`` lacks, from its ``rope_parameters``.

    Empty when there is nothing to fill (no ``rope_parameters``, or every field already set).
    ``rope_scaling`` is filled only for a scaled RoPE (``rope_type`` other than ``default``).
    """
    rp = config.get("rope_parameters")
    if not isinstance(rp, dict) or not rp:
        return {}
    nested = {k: v for k, v in rp.items() if isinstance(v, dict)}
    if nested:
        full = nested.get(_FULL) or next(iter(nested.values()))
        sliding = nested.get(_SLIDING)
    else:
        full, sliding = rp, None
    found: dict = {}
    if "rope_theta" in full:
        found["rope_theta"] = full["rope_theta"]
    if "partial_rotary_factor" in full:
        found["partial_rotary_factor"] = full["partial_rotary_factor"]
    kind = full.get("rope_type", full.get("type", "default"))
    if kind not in (None, "default"):
        scaling = {k: v for k, v in full.items() if k not in _NOT_SCALING}
        scaling.setdefault("type", kind)  # older mlx-lm models read "type", newer "rope_type"
        scaling.setdefault("rope_type", kind)
        found["rope_scaling"] = scaling
    if sliding is not None and "rope_theta" in sliding:
        found["rope_local_base_freq"] = sliding["rope_theta"]
    return {k: v for k, v in found.items() if config.get(k) is None}


def with_rope_fields(config: dict) -> dict:
    """A copy of ``config`` with ``rope_fields`` added (to ``text_config`` too, for multimodal
    configs); ``config`` itself is left as it is."""
    out = copy.deepcopy(config)
    out.update(rope_fields(out))
    text = out.get("text_config")
    if isinstance(text, dict):
        text.update(rope_fields(text))
    return out


def mlx_lm_overrides(config: dict) -> dict:
    """``model_config`` for ``mlx_lm.load`` (which reads config.json from disk): the RoPE fields
    of ``config``, a ``with_rope_fields`` config, so a transformers-5 file loads with its own."""
    out = {k: config[k] for k in MLX_LM_KEYS if config.get(k) is not None}
    if isinstance(config.get("text_config"), dict):
        out["text_config"] = config["text_config"]
    return out
