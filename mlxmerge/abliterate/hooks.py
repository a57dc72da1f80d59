"""Inference-time probes and edits, swapped into a loaded mlx-lm model (MLX has no hooks).

``LayerProbe`` wraps ``model.layers[i]``: records its input and output at the last positions,
and can add a vector to its input (activation addition). ``OutputProjection`` wraps a residual
writer (``o_proj``, ``down_proj``, stacked experts) and returns ``y − λ r (rᵀ y)``, which equals
running the orthogonalized weight ``(I − λ r rᵀ) W`` (bias included) on any ``Linear``,
``QuantizedLinear`` or ``SwitchLinear``: trials cost no weight copies and no requantization.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import mlx.core as mx
from mlx import nn

from mlxmerge.abliterate.architectures import Architecture


class _Slot:
    """Plain Python state kept out of the module tree (so it is not a parameter)."""

    def __init__(self):
        self.record = 0
        self.inputs: list[mx.array] = []
        self.outputs: list[mx.array] = []
        self.add: mx.array | None = None
        self.r: mx.array | None = None
        self.strength = 0.0


class _Transparent(nn.Module):
    """Attributes the wrapper lacks come from the wrapped module (``layer.use_sliding`` etc.)."""

    def __getattr__(self, key):
        try:
            return super().__getattr__(key)
        except AttributeError:
            for name in ("layer", "inner"):
                if name in self:
                    return getattr(self[name], key)
            raise


class LayerProbe(_Transparent):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.slot = _Slot()

    def __call__(self, x, *args, **kwargs):
        s = self.slot
        if s.add is not None:
            x = x + s.add.astype(x.dtype)
        if s.record:
            s.inputs.append(x[:, -s.record :, :])
        out = self.layer(x, *args, **kwargs)
        if s.record:
            h = out[0] if isinstance(out, tuple) else out
            s.outputs.append(h[:, -s.record :, :])
        return out


class OutputProjection(_Transparent):
    def __init__(self, inner: nn.Module, component: str, gain: mx.array | None):
        super().__init__()
        self.inner = inner
        self.slot = _Slot()
        self.component = component
        self.gain = gain  # post-norm gain, or None

    def __call__(self, x, *args, **kwargs):
        y = self.inner(x, *args, **kwargs)
        s = self.slot
        if s.r is None or s.strength == 0.0:
            return y
        r = s.r.astype(y.dtype)
        return y - s.strength * (y @ r)[..., None] * r


def _module_paths(module: nn.Module) -> dict[str, nn.Module]:
    return dict(module.named_modules())


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
    """A model with probes on every layer and projections on every residual writer."""

    def __init__(self, model: nn.Module, arch: Architecture):
        self.model = model
        self.layers = model.layers
        self.originals = list(self.layers)
        self.probes = [LayerProbe(layer) for layer in self.originals]
        # per layer: list of (path, original module, wrapper)
        self.writers: list[list[tuple[str, nn.Module, OutputProjection]]] = []
        for layer in self.originals:
            modules = _module_paths(layer)
            found = []
            for w in arch.writers:
                for path, m in modules.items():
                    if (
                        path
                        and re.fullmatch(w.pattern, path)
                        and not isinstance(m, OutputProjection)
                    ):
                        gain = None
                        if w.post_norm:
                            norm = modules[w.post_norm]
                            gain = arch.gain_offset + norm.weight.astype(mx.float32)
                        found.append((path, m, OutputProjection(m, w.component, gain)))
            self.writers.append(found)

    @contextmanager
    def installed(self):
        for i, probe in enumerate(self.probes):
            self.layers[i] = probe
            for path, _, wrapper in self.writers[i]:
                _set_child(probe.layer, path, wrapper)
        if self.model.layers[0] is not self.probes[0]:
            raise NotImplementedError(
                f"{type(self.model).__module__}: model.layers is a copy; cannot swap in probes"
            )
        try:
            yield self
        finally:
            for i, layer in enumerate(self.originals):
                for path, m, _ in self.writers[i]:
                    _set_child(layer, path, m)
                self.layers[i] = layer
            self.reset()

    def reset(self) -> None:
        for probe in self.probes:
            probe.slot = _Slot()
        for found in self.writers:
            for _, _, wrapper in found:
                wrapper.slot = _Slot()

    def set_ablation(self, directions, attn: list[float], mlp: list[float]) -> None:
        """Project ``directions[i]`` (or one shared direction) out of layer i's writers, λ per component."""
        for i, found in enumerate(self.writers):
            r = directions if directions is None or directions.ndim == 1 else directions[i]
            for _, _, wrapper in found:
                lam = attn[i] if wrapper.component == "attn" else mlp[i]
                rr = None
                if r is not None:
                    rr = r.astype(mx.float32)
                    if wrapper.gain is not None:
                        rr = wrapper.gain * rr
                    rr = rr / mx.maximum(mx.linalg.norm(rr), 1e-12)
                wrapper.slot.r, wrapper.slot.strength = rr, float(lam)

    def clear_ablation(self) -> None:
        for found in self.writers:
            for _, _, wrapper in found:
                wrapper.slot.r, wrapper.slot.strength = None, 0.0

    def n_writers(self) -> int:
        return sum(len(f) for f in self.writers)
