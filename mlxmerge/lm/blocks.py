"""The decoder blocks of any mlx-lm model, and the one wrapper swapped into them.

MLX has no forward hooks: to read or edit the residual stream we swap a ``Probe`` into the list
that holds the blocks (mlx-lm's ``quant/gptq.py`` does the same). ``model.layers`` is not always
that list: for pipeline-capable models (qwen2, qwen3_moe, deepseek_v2/v3, glm4_moe, ...) it is a
property returning a slice (``self.model.pipeline_layers``), and GPT-2 keeps its blocks in
``model.model.h``. ``decoder_blocks`` finds the owning list by identity of its elements.

Block i's output is HF ``hidden_states[i + 1]`` (SAELens ``blocks.{i}.hook_resid_post``); its
input is ``hidden_states[i]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlx.core as mx
from mlx import nn

from mlxmerge.errors import MlxmergeError
from mlxmerge.lm.load import model_type

# Attention code that reshapes queries to (B, n_kv, repeats, L, D) for grouped-query attention
# and so needs a (B, 1, 1, L, S) mask where mlx-lm's batch cache makes a (B, 1, L, S) one.
FIVE_D_MASK = {"gemma2"}


class Slot:
    """What a probe does on the next forward passes; plain state, out of the module tree."""

    def __init__(self):
        self.record: slice | None = (
            None  # positions of inputs/outputs to keep, e.g. slice(-3, None)
        )
        self.inputs: list[mx.array] = []
        self.outputs: list[mx.array] = []
        self.add: mx.array | None = None  # added to the block's input (activation addition)
        self.edit: Callable[[mx.array], mx.array] | None = None  # replaces the block's output


class Transparent(nn.Module):
    """Attributes the wrapper lacks come from the wrapped module (``layer.use_sliding`` etc.)."""

    def __getattr__(self, key):
        try:
            return super().__getattr__(key)
        except AttributeError:
            for name in ("layer", "inner"):
                if name in self:
                    return getattr(self[name], key)
            raise


class Probe(Transparent):
    """Stands in for one decoder block: runs it, and records / adds / edits per its ``slot``."""

    def __init__(self, layer: nn.Module, five_d_mask: bool = False):
        super().__init__()
        self.layer = layer
        self.slot = Slot()
        self._five_d = five_d_mask

    def __call__(self, x, *args, **kwargs):
        s = self.slot
        if s.add is not None:
            x = x + s.add.astype(x.dtype)
        if s.record is not None:
            s.inputs.append(x[:, s.record, :])
        if self._five_d:
            args, kwargs = _five_d(args, kwargs)
        out = self.layer(x, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        if s.edit is not None:
            h = s.edit(h)
            out = (h, *out[1:]) if isinstance(out, tuple) else h
        if s.record is not None:
            s.outputs.append(h[:, s.record, :])
        return out


def _five_d(args, kwargs):
    def fix(m):
        return m[:, :, None] if isinstance(m, mx.array) and m.ndim == 4 else m

    if "mask" in kwargs:
        return args, {**kwargs, "mask": fix(kwargs["mask"])}
    if args:
        return (fix(args[0]), *args[1:]), kwargs
    return args, kwargs


def _lists(obj, seen: set[int]) -> Iterator[list]:
    """Every Python list in a module tree (nn.Module is a dict of children)."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, list):
        yield obj
        for v in obj:
            if isinstance(v, (list, dict)):
                yield from _lists(v, seen)
    elif isinstance(obj, dict):
        for v in obj.values():
            if isinstance(v, (list, dict)):
                yield from _lists(v, seen)


class Blocks:
    """A view of the model's decoder blocks onto the list that owns them (get, set, len)."""

    def __init__(self, model: nn.Module, verb: str = "this command"):
        view = getattr(model, "layers", None)
        if view is None or not len(view):
            raise MlxmergeError(
                f"{verb} does not support model_type {model_type(model)!r}: the mlx-lm model "
                "has no list of decoder blocks (model.layers)"
            )
        view = list(view)
        first = view[0]
        for owner in _lists(model, set()):
            for k, item in enumerate(owner):
                if item is first and all(a is b for a, b in zip(owner[k:], view)):
                    self.owner, self.offset, self.n = owner, k, len(view)
                    self.model = model
                    return
        raise MlxmergeError(
            f"{verb} does not support model_type {model_type(model)!r}: cannot find the list "
            "that holds its decoder blocks"
        )

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> nn.Module:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.owner[self.offset + i % self.n]

    def __setitem__(self, i: int, block: nn.Module) -> None:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        self.owner[self.offset + i % self.n] = block

    def __iter__(self):
        return (self[i] for i in range(self.n))


def decoder_blocks(model: nn.Module, verb: str = "this command") -> Blocks:
    """The model's decoder blocks; an ``MlxmergeError`` naming ``verb`` when there are none."""
    return Blocks(model, verb)


def needs_five_d_mask(model: nn.Module) -> bool:
    args = getattr(model, "args", None)
    heads, kv = getattr(args, "num_attention_heads", 0), getattr(args, "num_key_value_heads", 0)
    return model_type(model) in FIVE_D_MASK and bool(kv) and kv < heads


@contextmanager
def probes(model: nn.Module, layers: list[int] | None = None, verb: str = "this command"):
    """Swap a ``Probe`` into each of ``layers`` (all by default); yields {layer: probe}.

    Blocks already holding a probe keep it (nesting is safe); on exit the original blocks return.
    """
    blocks = decoder_blocks(model, verb)
    layers = list(range(len(blocks))) if layers is None else list(layers)
    five_d = needs_five_d_mask(model)
    installed, out = {}, {}
    for i in layers:
        b = blocks[i]
        if isinstance(b, Probe):
            out[i] = b
            continue
        out[i] = installed[i] = Probe(b, five_d)
        blocks[i] = out[i]
    try:
        yield out
    finally:
        for i, p in installed.items():
            p.slot = Slot()
            blocks[i] = p.layer


@contextmanager
def batch_ready(model: nn.Module):
    """Make a left-padded batch run correctly: fixes the mask shape where mlx-lm's is wrong."""
    if needs_five_d_mask(model):
        with probes(model):
            yield
    else:
        yield
