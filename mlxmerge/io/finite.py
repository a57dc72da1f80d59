"""NaN / Inf checks on the tensors a verb reads and writes, at the cost of one reduction each.

A broken upload or an fp16 overflow leaves a few non-finite entries in a checkpoint; merged or
converted silently, they make a model that generates garbage. Checks ride on work already done:
an input's ``isfinite(x).all()`` is evaluated with the input itself (or, for a tensor copied file
to file, on the page-cache bytes through a memory map); an output's with the output. Entries are
counted only once a check fails.
"""

from __future__ import annotations

import logging
import mmap
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxmerge.errors import NonFiniteError

log = logging.getLogger(__name__)

# An IEEE float is NaN or Inf exactly when every exponent bit is set.
EXPONENT_MASKS = {
    mx.bfloat16: (np.uint16, 0x7F80),
    mx.float16: (np.uint16, 0x7C00),
    mx.float32: (np.uint32, 0x7F800000),
}
SCAN_CHUNK = 16 * 1024**2  # bytes per step of a byte scan: small enough to stay in cache


def is_checked(dtype: mx.Dtype) -> bool:
    return dtype in EXPONENT_MASKS


def all_finite(x: mx.array) -> mx.array:
    """A lazy scalar, True when every entry of ``x`` is finite (integers always are).

    For bfloat16/float32 it is ``isfinite(sum(x))``: NaN and Inf propagate through a sum, and
    a reduction needs no full-size temporary (``isfinite(x)`` would add a bool copy of ``x``).
    A finite tensor whose sum overflows reads False too; callers then count exactly.
    """
    if not is_checked(x.dtype):
        return mx.array(True)
    if x.dtype == mx.float16:  # its sum overflows at 65504: test entry by entry
        return mx.isfinite(x).all()
    return mx.isfinite(mx.sum(x))


def count_nonfinite(x: mx.array) -> tuple[int, int]:
    """(NaN count, ±Inf count) of ``x``; evaluates ``x``."""
    nan, inf = mx.isnan(x).sum(), mx.isinf(x).sum()
    mx.eval(nan, inf)
    return int(nan.item()), int(inf.item())


def count_bytes(
    file: Path, offset: int, nbytes: int, dtype: mx.Dtype, *, stop_at_first: bool = False
) -> tuple[int, int]:
    """(NaN, Inf) counts of a tensor stored at ``offset`` of ``file``, read through mmap.

    Streams the bytes chunk by chunk (page cache, no copy of the whole tensor): memory stays
    flat. With ``stop_at_first`` it returns after the first chunk holding a non-finite entry.
    """
    if not is_checked(dtype) or nbytes == 0:
        return 0, 0
    word, mask = EXPONENT_MASKS[dtype]
    size = np.dtype(word).itemsize
    mantissa = ~np.array(mask | (1 << (8 * size - 1)), dtype=word)  # every bit but sign/exponent
    nan = inf = 0
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        step = SCAN_CHUNK // size * size
        for start in range(offset, offset + nbytes, step):
            count = min(step, offset + nbytes - start) // size
            n_nan, n_inf = _count_words(m, word, mask, mantissa, count, start)
            nan, inf = nan + n_nan, inf + n_inf
            if stop_at_first and (n_nan or n_inf):
                break
    return nan, inf


def _count_words(m, word, mask, mantissa, count: int, start: int) -> tuple[int, int]:
    # A function of its own so the views of the map are gone before the map closes.
    w = np.frombuffer(m, dtype=word, count=count, offset=start)
    special = (w & mask) == mask
    if not special.any():  # the usual case: one cheap pass per chunk
        return 0, 0
    s = w[special]
    n_nan = int(np.count_nonzero(s & mantissa))
    return n_nan, s.size - n_nan


def describe(nan: int, inf: int) -> str:
    return f"{nan} NaN and {inf} Inf entr{'y' if nan + inf == 1 else 'ies'}"


@dataclass
class FiniteGuard:
    """What a verb does when a tensor holds NaN or Inf: stop (default) or warn and go on.

    ``verb`` names what produced the outputs in messages ("ties merge", "convert").
    ``watch`` registers an input's lazy check; the writer evaluates pending checks together
    with the output that reads them (``settle``), so no extra pass over the data is made.
    """

    allow: bool = False
    verb: str = "output"
    warnings: list[str] = field(default_factory=list)
    _pending: list = field(default_factory=list)

    def report(self, message: str) -> None:
        if not self.allow:
            raise NonFiniteError(f"{message}; pass --allow-nonfinite to write it anyway")
        self.warnings.append(message)
        log.warning(message)

    # -- inputs -------------------------------------------------------------------------------
    def input_message(self, model: str, name: str, nan: int, inf: int) -> str:
        return (
            f"{model}: tensor {name} holds {describe(nan, inf)} (a broken upload or an fp16 "
            "overflow in the source model)"
        )

    def watch(self, model: str, name: str, x: mx.array) -> mx.array:
        """Return ``x``; its finiteness is checked when the output that reads it is evaluated."""
        if is_checked(x.dtype):
            self._pending.append((model, name, x, all_finite(x)))
        return x

    def flags(self) -> list[mx.array]:
        return [flag for *_, flag in self._pending]

    def settle(self) -> None:
        """Report every watched input whose (evaluated) check failed; forget them all."""
        pending, self._pending = self._pending, []
        for model, name, x, flag in pending:
            self.check_input(model, name, x, flag)

    def check_input(self, model: str, name: str, x: mx.array, flag: mx.array) -> None:
        """``flag`` is ``all_finite(x)``, already evaluated with ``x``."""
        if not flag.item():
            nan, inf = count_nonfinite(x)
            if nan or inf:  # else only the sum overflowed
                self.report(self.input_message(model, name, nan, inf))

    def check_bytes(self, model: str, name: str, file, offset, nbytes, dtype) -> None:
        """A tensor copied file to file: scan its stored bytes (mmap, flat memory)."""
        nan, inf = count_bytes(file, offset, nbytes, dtype, stop_at_first=True)
        if nan or inf:
            self.report(self.input_message(model, name, *count_bytes(file, offset, nbytes, dtype)))

    # -- outputs ------------------------------------------------------------------------------
    def check_output(self, name: str, x: mx.array, flag: mx.array) -> None:
        """``flag`` is ``all_finite(x)``, already evaluated with ``x`` (in the output dtype)."""
        if not flag.item() and any(counts := count_nonfinite(x)):
            nan, inf = counts
            self.report(
                f"{self.verb}: output tensor {name} holds {describe(nan, inf)} in "
                f"{str(x.dtype).removeprefix('mlx.core.')} (an overflow of the output dtype "
                "or a division by a zero norm)"
            )
