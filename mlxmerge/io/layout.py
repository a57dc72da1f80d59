"""Tensor naming differences between MLX layout (what mlx-lm writes) and Hugging Face layout.

mlx-lm's ``sanitize`` stacks each MoE expert projection into one ``(n_experts, out, in)``
tensor under ``switch_mlp``; transformers keeps one tensor per expert. Writing HF layout from an
MLX checkpoint splits them back, with the per-architecture names below (data, not code).
"""

from __future__ import annotations

import re

# model_type → (stacked MLX module, per-expert HF module with {e}, projection renames)
EXPERT_NAMES: dict[str, tuple[str, str, dict[str, str]]] = {
    "mixtral": (
        "block_sparse_moe.switch_mlp",
        "block_sparse_moe.experts.{e}",
        {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
    ),
}
for _t in (
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek",
    "deepseek_v2",
    "deepseek_v3",
    "phimoe",
    "granitemoe",
):
    EXPERT_NAMES.setdefault(_t, ("mlp.switch_mlp", "mlp.experts.{e}", {}))


def hf_expert_names(name: str, shape: tuple[int, ...], model_type: str | None) -> list[str] | None:
    """Per-expert HF names for a stacked MLX expert tensor, or None if ``name`` is not one."""
    spec = EXPERT_NAMES.get(model_type or "")
    if spec is None or len(shape) != 3:
        return None
    stacked, per_expert, renames = spec
    m = re.match(rf"^(.*)\.{re.escape(stacked)}\.(\w+)\.(weight|bias)$", name)
    if m is None:
        return None
    prefix, proj, kind = m.groups()
    proj = renames.get(proj, proj)
    return [f"{prefix}.{per_expert.format(e=e)}.{proj}.{kind}" for e in range(shape[0])]
