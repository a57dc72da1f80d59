"""Inference-time edits of the residual writers, swapped into a loaded mlx-lm model.

Layer inputs and outputs are read (and vectors added) through ``mlxmerge.lm.blocks`` probes.
``OutputProjection`` wraps a residual writer (``o_proj``, ``down_proj``, stacked experts) and
returns ``y − λ r (rᵀ y)``, which equals running the orthogonalized weight ``(I − λ r rᵀ) W``
(bias included) on any ``Linear``, ``QuantizedLinear`` or ``SwitchLinear``: trials cost no
weight copies and no requantization.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import mlx.core as mx
from mlx import nn

from mlxmerge.abliterate.architectures import Architecture
from mlxmerge.lm.blocks import Slot, Transparent, decoder_blocks, probes


class _Edit:
    """Plain Python state kept out of the module tree (so it is not a parameter)."""

    def __init__(self):
        self.r: mx.array | None = None
        self.strength = 0.0
        # Screening: (R (d, K) unit candidate directions, a (..., K) zeros). The output becomes
        # y + ((y R) ⊙ a) Rᵀ, equal to y, but ∂f/∂a_k = Σ_t (gᵀr_k)(r_kᵀy): the first-order
        # effect of ablating candidate k (screening.py).
        self.screen: tuple[mx.array, mx.array] | None = None


class OutputProjection(Transparent):
    def __init__(self, inner: nn.Module, component: str, gain: mx.array | None):
        super().__init__()
        self.inner = inner
        self.component = component
        self.gain = gain  # post-norm gain, or None
        self.slot = _Edit()

    def __call__(self, x, *args, **kwargs):
        y = self.inner(x, *args, **kwargs)
        s = self.slot
        if s.screen is not None:
            R, a = s.screen
            if a.ndim > 1 and y.shape[0] not in (1, a.shape[0]):
                # Per-prompt screening, but this writer's rows are not prompts (mlx-lm's
                # SwitchGLU sorts token-expert pairs by expert): left out of the per-prompt sums.
                # (One row is the shared prefix: broadcast to every prompt, kept.)
                a = None
            elif a.ndim > 1:
                a = a.reshape(a.shape[0], *([1] * (y.ndim - 2)), a.shape[-1])
            if a is not None:
                y = y + ((y @ R) * a) @ R.T
        if s.r is None or s.strength == 0.0:
            return y
        r = s.r.astype(y.dtype)
        return y - s.strength * (y @ r)[..., None] * r


def _set_child(root: nn.Module, path: str, value: nn.Module) -> None:
    parts = path.split(".")
    parent = root
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else getattr(parent, p)
    if isinstance(parent, list):
        parent[int(parts[-1])] = value
    else:
        setattr(parent, parts[-1], value)


class Instrumented:
    """A model with probes on every decoder block and projections on every residual writer."""

    def __init__(self, model: nn.Module, arch: Architecture):
        self.model = model
        self.originals = list(decoder_blocks(model, "abliterate"))
        self.probes: list = []
        # per layer: list of (path, original module, wrapper)
        self.writers: list[list[tuple[str, nn.Module, OutputProjection]]] = []
        for layer in self.originals:
            modules = dict(layer.named_modules())
            found = []
            for w in arch.writers:
                for path, m in modules.items():
                    if path and re.fullmatch(w.pattern, path):
                        gain = None
                        if w.post_norm:
                            norm = modules[w.post_norm]
                            gain = arch.gain_offset + norm.weight.astype(mx.float32)
                        found.append((path, m, OutputProjection(m, w.component, gain)))
            self.writers.append(found)

    @contextmanager
    def installed(self):
        with probes(self.model, verb="abliterate") as installed:
            self.probes = [installed[i] for i in range(len(self.originals))]
            for i, layer in enumerate(self.originals):
                for path, _, wrapper in self.writers[i]:
                    _set_child(layer, path, wrapper)
            try:
                yield self
            finally:
                for i, layer in enumerate(self.originals):
                    for path, m, _ in self.writers[i]:
                        _set_child(layer, path, m)
                self.reset()
                self.probes = []

    def reset(self) -> None:
        for probe in self.probes:
            probe.slot = Slot()
        self.clear_ablation()

    def set_ablation(self, directions, attn: list[float], mlp: list[float]) -> None:
        """Project ``directions[i]`` (or one shared direction) out of layer i's writers, λ per component."""
        for i, found in enumerate(self.writers):
            r = directions if directions is None or directions.ndim == 1 else directions[i]
            for _, _, wrapper in found:
                lam = attn[i] if wrapper.component == "attn" else mlp[i]
                rr = None if r is None else writer_direction(r, wrapper)
                wrapper.slot.r, wrapper.slot.strength = rr, float(lam)

    def clear_ablation(self) -> None:
        for found in self.writers:
            for _, _, wrapper in found:
                wrapper.slot.r, wrapper.slot.strength, wrapper.slot.screen = None, 0.0, None

    def n_writers(self) -> int:
        return sum(len(f) for f in self.writers)


def writer_direction(r: mx.array, wrapper: OutputProjection) -> mx.array:
    """Unit direction(s) (d,) or (d, K) as ``wrapper`` removes them: post-norm uses normalize(g ⊙ r)."""
    rr = r.astype(mx.float32)
    if wrapper.gain is not None:
        rr = (wrapper.gain if rr.ndim == 1 else wrapper.gain[:, None]) * rr
    return rr / mx.maximum(mx.linalg.norm(rr, axis=0, keepdims=True), 1e-12)
