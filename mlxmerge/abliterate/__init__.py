"""Abliteration: find the refusal direction, remove it from the weights, measure the result."""

from mlxmerge.abliterate.evaluate import refusals
from mlxmerge.abliterate.pipeline import abliterate, orthogonalize_model

__all__ = ["abliterate", "orthogonalize_model", "refusals"]
