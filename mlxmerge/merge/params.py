"""What a merge-method parameter is: its kind, range, default and one-line meaning.

A ``Param`` is declared once in a METHODS row (``mlxmerge.merge.registry``) and drives the
validation of recipe values, the ``--help`` of the per-method commands and the parameter tables
of docs/merging-methods.md.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

__all__ = ["KINDS", "REQUIRED", "Param", "choice", "flag", "number", "whole"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Sentinel default of a parameter the recipe must set."""

KINDS = ("number", "int", "bool", "choice")


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method: what it holds, its range, default and meaning.

    The single source for validation (``check_params``), ``--help`` of the per-method commands
    and the parameter tables of docs/merging-methods.md.
    """

    kind: str
    """'number' (a real; takes gradients and filtered values), 'int', 'bool' or 'choice'."""
    meaning: str
    """One line: what the value does."""
    default: Any = REQUIRED
    low: float | None = None
    """Smallest allowed value (inclusive), numbers and ints."""
    high: float | None = None
    """Largest allowed value (inclusive), numbers."""
    choices: tuple[str, ...] = ()
    """Allowed strings of a 'choice'."""

    @property
    def gradient(self) -> bool:
        """Whether a gradient (``[0, 0.5, 1]``) makes sense: only for real numbers."""
        return self.kind == "number"

    def range_text(self) -> str:
        """The allowed values in words: ``in [0, 1]``, ``>= 0``, ``true or false``, ..."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        what = "a whole number" if self.kind == "int" else "a number"
        if self.low is not None and self.high is not None:
            return f"in [{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"{what} >= {self.low:g}"
        if self.high is not None:
            return f"{what} <= {self.high:g}"
        return "any finite number" if self.kind == "number" else what

    def default_text(self) -> str:
        if self.default is REQUIRED:
            return "required"
        if self.default is None:
            return "none"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)

    def accepts(self, value: Any) -> bool:
        """Whether one scalar value (one point of a gradient) is allowed."""
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if not math.isfinite(value):  # inf or nan would only surface as NaN in the output
            return False
        if self.kind == "int" and int(value) != value:
            return False
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


def from_default(default: Any, choices: tuple[str, ...] = ()) -> Param:
    """A Param for a row that gives a bare default (undocumented: its meaning is empty)."""
    if choices:
        return Param("choice", "", default, choices=tuple(choices))
    if isinstance(default, bool):
        return Param("bool", "", default)
    return Param("number", "", default)


def number(meaning: str, default: Any = REQUIRED, low=None, high=None) -> Param:
    """A real number in [low, high] (None: unbounded); takes gradients and filters."""
    return Param("number", meaning, default, low, high)


def flag(meaning: str, default: bool) -> Param:
    """true or false; one value (a filter may still select it)."""
    return Param("bool", meaning, default)


def choice(meaning: str, default: str, choices: tuple[str, ...]) -> Param:
    """One of ``choices``."""
    return Param("choice", meaning, default, choices=tuple(choices))


def whole(meaning: str, default: int, low: int | None = None) -> Param:
    """A whole number >= low; one value."""
    return Param("int", meaning, default, low)


def leaves(value):
    """Scalar values inside a parameter: a number, a gradient list, or [{filter, value}, ...]."""
    if isinstance(value, dict):
        if "value" in value:
            yield from leaves(value["value"])
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from leaves(v)
        return
    yield value


def is_gradient(value) -> bool:
    """A list of values (not of ``{filter, value}`` entries): interpolated across layers."""
    return isinstance(value, (list, tuple)) and not any(isinstance(v, dict) for v in value)


def gradients(value):
    """The gradients inside a parameter (itself, or the value of a filtered entry)."""
    if is_gradient(value):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, dict) and is_gradient(v.get("value")):
                yield v["value"]
    elif isinstance(value, dict) and is_gradient(value.get("value")):
        yield value["value"]
