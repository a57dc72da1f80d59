"""The dtype forward passes run in: float32 on a CPU device for bf16/fp16 weights, else as stored.

MLX's CPU backend sends float32 matmuls to BLAS (all cores) but runs bfloat16/float16 ones in a
generic one-thread kernel, 5-20x slower on a released (bf16) model; on Metal and CUDA the
half-precision kernels are the fast ones. So ``auto`` casts a half-precision model to float32 on
the CPU only. The setting is contextual (like ``mx.stream``): ``with compute_dtype("bfloat16"):``
around a library call, or ``--compute-dtype`` on the CLI; ``lm.load`` applies it to every model
it returns. Only the loaded copy is cast: outputs that write weights (merges, abliterate's export)
read the checkpoint's tensors and keep their own dtype.
"""

from __future__ import annotations

import contextlib
import logging
from contextvars import ContextVar

import mlx.core as mx
from mlx import nn

from mlxmerge.errors import MlxmergeError

log = logging.getLogger(__name__)

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
_HALF = (mx.bfloat16, mx.float16)
_setting: ContextVar[str] = ContextVar("mlxmerge_compute_dtype", default="auto")


def check_compute_dtype(name: str) -> str:
    if name not in COMPUTE_DTYPES:
        raise MlxmergeError(
            f"unknown compute dtype {name!r}; expected one of {', '.join(COMPUTE_DTYPES)}"
        )
    return name


@contextlib.contextmanager
def compute_dtype(name: str):
    """Run the forward passes of the enclosed calls in ``name`` (one of ``COMPUTE_DTYPES``)."""
    token = _setting.set(check_compute_dtype(name))
    try:
        yield
    finally:
        _setting.reset(token)


def current_compute_dtype() -> str:
    return _setting.get()


def _on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def resolve_compute_dtype(stored: set, name: str | None = None, cpu: bool | None = None):
    """The dtype to cast floating weights to, or None to keep them as stored.

    ``stored`` is the set of floating dtypes the model's parameters have. ``auto``: float32 when
    the device is the CPU and some parameter is bf16/fp16, else None.
    """
    name = check_compute_dtype(name or _setting.get())
    if name != "auto":
        target = getattr(mx, name)
        return None if stored <= {target} else target
    cpu = _on_cpu() if cpu is None else cpu
    return mx.float32 if cpu and stored & set(_HALF) else None


def _floating(model: nn.Module) -> list[mx.array]:
    from mlx.utils import tree_flatten

    return [x for _, x in tree_flatten(model.parameters()) if mx.issubdtype(x.dtype, mx.floating)]


def _name(dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def to_compute_dtype(model: nn.Module, name: str | None = None, *, label: str = "model") -> str:
    """Cast ``model``'s floating parameters (lazily: call before they are evaluated, so each is
    read and cast once) to the compute dtype, and log what it did and what it costs.

    ``name`` overrides the contextual setting. Quantized layers stay quantized (their packed
    integer weights are left alone; scales and biases follow). On the CPU, stacked MoE experts
    (mlx-lm's ``SwitchLinear``) are float32 whatever is asked: MLX's CPU ``gather_mm`` takes
    float32 only. Returns the name of the dtype the model now computes in (its largest floating
    dtype). Raises ``MlxmergeError`` for an unknown ``name``.
    """
    params = _floating(model)
    stored = {x.dtype for x in params}
    before = sum(x.nbytes for x in params)
    target = resolve_compute_dtype(stored, name)
    if target is not None:
        model.set_dtype(target)
    experts = _experts_to_float32(model)
    after = sum(x.nbytes for x in _floating(model))
    now = {x.dtype for x in _floating(model)}
    result = "float32" if mx.float32 in now else _name(next(iter(now), mx.float32))
    was = "/".join(sorted(_name(d) for d in stored)) or "no floating"
    if target is None and not experts:
        log.info("%s: %s weights compute as stored (%.3g MB)", label, was, before / 1e6)
        return result
    where = "the CPU" if _on_cpu() else "the GPU"
    what = [f"{was} weights compute in {_name(target)} on {where}"] if target is not None else []
    to_f32 = target is not None and target == mx.float32
    if to_f32 and stored & set(_HALF) and _on_cpu():
        what[0] += " (MLX's CPU matmul is fast in float32 only; --compute-dtype to change)"
    if experts and not to_f32:
        what.append(f"{experts} MoE expert layers in float32 (MLX's CPU gather_mm needs it)")
    log.info("%s: %s: %.3g MB of weights instead of %.3g MB", label, "; ".join(what),
             after / 1e6, before / 1e6)  # fmt: skip
    return result


def _experts_to_float32(model: nn.Module) -> int:
    """Cast stacked (unquantized) MoE expert weights to float32 on a CPU device; returns how many
    modules were cast. A bf16 Mixtral otherwise fails its first CPU forward pass with
    ``[GatherMM::eval] Currently only supports float32``."""
    from mlx_lm.models.switch_layers import SwitchLinear

    if not _on_cpu():
        return 0
    cast = 0
    for _, module in model.named_modules():
        if isinstance(module, SwitchLinear) and module.weight.dtype != mx.float32:
            module.set_dtype(mx.float32)
            cast += 1
    return cast
