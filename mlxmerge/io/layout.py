"""Tensor naming differences between MLX layout (what mlx-lm writes) and Hugging Face layout.

MLX layout is the canonical one inside mlxmerge: a checkpoint in HF layout is read through the
mapping below (``hf_to_mlx``), so merges and edits see one set of names whatever layout each
input uses, and an HF-layout output is written through the inverse (``mlx_to_hf``). What
differs, per ``model_type`` (data, not code):

- MoE experts: mlx-lm's ``sanitize`` stacks each expert projection into one
  ``(n_experts, out, in)`` tensor under ``switch_mlp``; transformers checkpoints keep one tensor
  per expert (Mixtral ``experts.{e}.w1``), or, for GraniteMoE, one fused
  ``input_linear`` = concat(gate, up) of shape ``(n_experts, 2·inter, hidden)``.
- GPT-2: HF names have no ``model.`` prefix (or ``transformer.``), and its Conv1D weights are
  stored ``(in, out)``, the transpose of mlx-lm's Linear.

Sources: mlx-lm ``models/*.py`` ``sanitize``; transformers ``conversion_mapping.py`` (the legacy
checkpoint names it converts from) and ``modeling_gpt2.py`` (Conv1D).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import mlx.core as mx

from mlxmerge.errors import CheckpointError


@dataclass(frozen=True)
class Experts:
    """Stacked MLX experts ``{layer}.{stacked}.{proj}`` ↔ per-expert HF ``{layer}.{per_expert}.{proj'}``."""

    stacked: str  # e.g. "block_sparse_moe.switch_mlp"
    per_expert: str  # with {e}, e.g. "block_sparse_moe.experts.{e}"
    renames: dict[str, str] = field(default_factory=dict)  # MLX proj → HF proj


@dataclass(frozen=True)
class FusedExperts:
    """Stacked MLX gate/up/down ↔ HF 3-D ``fused`` = concat(gate, up, axis 1) and ``down``."""

    stacked: str  # e.g. "block_sparse_moe.switch_mlp"
    fused: str  # HF module holding concat(gate_proj, up_proj), e.g. "block_sparse_moe.input_linear"
    down: str  # HF module holding down_proj, e.g. "block_sparse_moe.output_linear"


@dataclass(frozen=True)
class ArchLayout:
    experts: Experts | FusedExperts | None = None
    mlx_prefix: str = ""  # added to HF names that lack it (GPT-2: "model.")
    hf_prefixes: tuple[str, ...] = ()  # HF prefixes replaced by mlx_prefix on reading
    transposed: str | None = None  # regex of HF weights stored (in, out)
    ignore: str | None = None  # regex of HF buffers mlx-lm drops


_MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_PER_EXPERT_MLP = Experts("mlp.switch_mlp", "mlp.experts.{e}")

LAYOUTS: dict[str, ArchLayout] = {
    "mixtral": ArchLayout(
        Experts("block_sparse_moe.switch_mlp", "block_sparse_moe.experts.{e}", _MIXTRAL_NAMES)
    ),
    "phimoe": ArchLayout(
        Experts("block_sparse_moe.switch_mlp", "block_sparse_moe.experts.{e}", _MIXTRAL_NAMES)
    ),
    "granitemoe": ArchLayout(
        FusedExperts(
            "block_sparse_moe.switch_mlp",
            "block_sparse_moe.input_linear",
            "block_sparse_moe.output_linear",
        )
    ),
    "gpt2": ArchLayout(
        mlx_prefix="model.",
        hf_prefixes=("transformer.", ""),
        transposed=r"^h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$",
        ignore=r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$",
    ),
}
for _t in ("qwen2_moe", "qwen3_moe", "olmoe", "deepseek", "deepseek_v2", "deepseek_v3"):
    LAYOUTS[_t] = ArchLayout(_PER_EXPERT_MLP)


@dataclass(frozen=True)
class Derived:
    """A tensor computed from others: ``op`` applied to ``sources`` (in order).

    ops: copy (a rename), transpose (2-D), stack (axis 0), index (``x[arg]``),
    concat (axis 1), half (``arg``-th half along axis 1).
    """

    sources: tuple[str, ...]
    op: str
    shape: tuple[int, ...]
    arg: int = 0

    def apply(self, xs: list[mx.array]) -> mx.array:
        if self.op == "copy":
            return xs[0]
        if self.op == "transpose":
            return xs[0].T
        if self.op == "stack":
            return mx.stack(xs)
        if self.op == "index":
            return xs[0][self.arg]
        if self.op == "concat":
            return mx.concatenate(xs, axis=1)
        if self.op == "half":
            n = xs[0].shape[1] // 2
            return xs[0][:, self.arg * n : (self.arg + 1) * n]
        raise AssertionError(self.op)


def layout_of(model_type: str | None) -> ArchLayout:
    return LAYOUTS.get(model_type or "", ArchLayout())


def hf_to_mlx(shapes: dict[str, tuple[int, ...]], model_type: str | None) -> dict[str, Derived]:
    """MLX (canonical) name → how to compute it from the checkpoint's tensors ``shapes``.

    Tensors already in MLX layout map to themselves (op copy); so do mixed checkpoints.
    Raises CheckpointError when a model's experts are incomplete (expert 3 of 4 missing).
    """
    lay = layout_of(model_type)
    out: dict[str, Derived] = {}
    grouped: dict[tuple[str, str, str], dict[int, str]] = {}  # (layer, proj, kind) → {e: name}
    for name, shape in shapes.items():
        if lay.ignore and re.search(lay.ignore, name):
            continue
        if isinstance(lay.experts, Experts):
            m = _match_expert(name, lay.experts)
            if m is not None:
                prefix, e, proj, kind = m
                grouped.setdefault((prefix, proj, kind), {})[e] = name
                continue
        if isinstance(lay.experts, FusedExperts):
            fx = lay.experts
            m = re.match(rf"^(.*)\.({re.escape(fx.fused)}|{re.escape(fx.down)})\.weight$", name)
            if m is not None and len(shape) == 3:
                prefix, module = m.groups()
                if module == fx.fused:
                    half = (shape[0], shape[1] // 2, shape[2])
                    for i, proj in enumerate(("gate_proj", "up_proj")):
                        mlx = f"{prefix}.{fx.stacked}.{proj}.weight"
                        out[mlx] = Derived((name,), "half", half, i)
                else:
                    out[f"{prefix}.{fx.stacked}.down_proj.weight"] = Derived((name,), "copy", shape)
                continue
        if lay.mlx_prefix and not name.startswith((lay.mlx_prefix, "lm_head.")):
            bare = next((name.removeprefix(p) for p in lay.hf_prefixes if name.startswith(p)), name)
            if lay.transposed and re.search(lay.transposed, bare) and len(shape) == 2:
                out[lay.mlx_prefix + bare] = Derived((name,), "transpose", shape[::-1])
            else:
                out[lay.mlx_prefix + bare] = Derived((name,), "copy", shape)
            continue
        out[name] = Derived((name,), "copy", shape)
    for (prefix, proj, kind), by_e in grouped.items():
        n = len(by_e)
        if sorted(by_e) != list(range(n)):
            missing = sorted(set(range(max(by_e) + 1)) - set(by_e))
            raise CheckpointError(
                f"{prefix}: experts {missing} of {proj}.{kind} are missing; the checkpoint is incomplete"
            )
        srcs = tuple(by_e[e] for e in range(n))
        stacked = f"{prefix}.{lay.experts.stacked}.{_mlx_proj(proj, lay.experts)}.{kind}"
        out[stacked] = Derived(srcs, "stack", (n, *shapes[srcs[0]]))
    return out


def mlx_to_hf(
    plan: list[tuple[str, tuple[int, ...]]], model_type: str | None
) -> list[tuple[str, Derived]]:
    """The HF-layout tensors (name, how to compute it from planned MLX names) of ``plan``.

    Raises CheckpointError for a stacked expert tensor whose HF names are not known for
    ``model_type``: an HF export never holds a silent 3-D ``switch_mlp`` tensor.
    """
    lay = layout_of(model_type)
    shapes = dict(plan)
    out: list[tuple[str, Derived]] = []
    for name, shape in plan:
        shape = tuple(shape)
        if isinstance(lay.experts, Experts) and len(shape) == 3:
            m = re.match(rf"^(.*)\.{re.escape(lay.experts.stacked)}\.(\w+)\.(weight|bias)$", name)
            if m is not None:
                prefix, proj, kind = m.groups()
                proj = lay.experts.renames.get(proj, proj)
                for e in range(shape[0]):
                    hf = f"{prefix}.{lay.experts.per_expert.format(e=e)}.{proj}.{kind}"
                    out.append((hf, Derived((name,), "index", shape[1:], e)))
                continue
        if isinstance(lay.experts, FusedExperts) and len(shape) == 3:
            fx = lay.experts
            m = re.match(rf"^(.*)\.{re.escape(fx.stacked)}\.(gate_proj|up_proj|down_proj)\.weight$", name)  # fmt: skip
            if m is not None:
                prefix, proj = m.groups()
                if proj == "down_proj":
                    out.append((f"{prefix}.{fx.down}.weight", Derived((name,), "copy", shape)))
                elif proj == "gate_proj":
                    up = f"{prefix}.{fx.stacked}.up_proj.weight"
                    if up not in shapes:
                        raise CheckpointError(f"{name}: its up_proj {up} is not in the output")
                    fused = (shape[0], shape[1] + shapes[up][1], shape[2])
                    out.append((f"{prefix}.{fx.fused}.weight", Derived((name, up), "concat", fused)))  # fmt: skip
                continue  # up_proj went into the fused tensor with its gate_proj
        if _MLX_STACKED.search(name):
            raise CheckpointError(
                f"{name}: no Hugging Face names are known for the stacked experts of model_type "
                f"{model_type}; write it with --format mlx"
            )
        if lay.mlx_prefix and name.startswith(lay.mlx_prefix):
            bare = name.removeprefix(lay.mlx_prefix)
            if lay.transposed and re.search(lay.transposed, bare) and len(shape) == 2:
                out.append((bare, Derived((name,), "transpose", shape[::-1])))
            else:
                out.append((bare, Derived((name,), "copy", shape)))
            continue
        out.append((name, Derived((name,), "copy", shape)))
    return out


# mlx-lm's stacked expert modules (SwitchGLU / SwitchMLP); HF's own fused names
# (``experts.gate_up_proj``) do not match.
_MLX_STACKED = re.compile(
    r"\.(switch_mlp|switch_glu)\.|\.experts\.(gate_proj|up_proj|down_proj|fc1|fc2)\.(weight|bias)$"
)


def _match_expert(name: str, ex: Experts) -> tuple[str, int, str, str] | None:
    pattern = re.escape(ex.per_expert).replace(r"\{e\}", r"(\d+)")
    m = re.match(rf"^(.*)\.{pattern}\.(\w+)\.(weight|bias|scales|biases)$", name)
    if m is None:
        return None
    prefix, e, proj, kind = m.groups()
    return prefix, int(e), proj, kind


def _mlx_proj(hf_proj: str, ex: Experts) -> str:
    back = {v: k for k, v in ex.renames.items()}
    return back.get(hf_proj, hf_proj)


# Standard config keys and other architectures' names for them (GPT-2, GPT-J, MPT, Falcon).
CONFIG_ALIASES = {
    "hidden_size": ("n_embd", "d_model", "dim"),
    "num_hidden_layers": ("n_layer", "n_layers", "num_layers"),
    "num_attention_heads": ("n_head", "n_heads"),
    "intermediate_size": ("n_inner", "ffn_hidden_size"),
}


# -- decoder layer names (every scheme mlx-lm uses: layers.N, h.N, blocks.N) --

_LAYER = re.compile(r"(^|\.)(layers|h|blocks)\.(\d+)\.")
# Tensors before the first decoder layer; everything else outside the layers comes after.
_INPUT_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|wpe|embed_in|word_embeddings|emb)\.")


def renumber_layer(name: str, new_index: int) -> str:
    """``name`` moved to decoder layer ``new_index`` (``model.h.3.attn...`` → ``model.h.0...``)."""
    return _LAYER.sub(rf"\g<1>\g<2>.{new_index}.", name, count=1)


def layer_structure(names) -> dict[int, frozenset[str]]:
    """Per decoder layer index, its tensor names with the index blanked (``model.layers.N.mlp...``).

    Two layers with different structures (a dense MLP and MoE experts) cannot swap places: the
    config describes each layer's kind by its index (DeepSeek ``first_k_dense_replace``,
    Qwen-MoE ``mlp_only_layers``).
    """
    out: dict[int, set[str]] = {}
    for name in names:
        m = _LAYER.search(name)
        if m is not None:
            out.setdefault(int(m.group(3)), set()).add(_LAYER.sub(r"\g<1>\g<2>.N.", name, count=1))
    return {i: frozenset(v) for i, v in out.items()}


def is_input_embedding(name: str) -> bool:
    """Token/position embeddings: the tensors a frankenmerge takes from its first slice."""
    return _INPUT_EMBEDDING.search(name) is not None
