"""Prompt sets: the bundled defaults (written for this project) or user files, split train/val/test."""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mlxmerge.eval.prompts import read_prompts

SPLITS = ("train", "val", "test")


@dataclass
class PromptSet:
    """One kind of prompt (harmful or harmless) split three ways, disjoint."""

    train: list[str]
    val: list[str]
    test: list[str]
    source: str  # "bundled" or the file path


def bundled_prompts(kind: str, split: str) -> list[str]:
    """A split of the bundled ``harmful`` or ``harmless`` set (400/100/100 prompts)."""
    text = resources.files("mlxmerge.abliterate").joinpath(f"data/{kind}_{split}.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def prompt_set(kind: str, path: str | Path | None = None, *, column: str | None = None,
               seed: int = 0) -> PromptSet:  # fmt: skip
    """The bundled set, or a user file shuffled with ``seed`` and split 60/20/20."""
    if path is None:
        return PromptSet(*(bundled_prompts(kind, s) for s in SPLITS), source="bundled")
    prompts = list(dict.fromkeys(read_prompts(path, column)))
    random.Random(seed).shuffle(prompts)
    n = len(prompts)
    a, b = round(0.6 * n), round(0.8 * n)
    return PromptSet(prompts[:a], prompts[a:b], prompts[b:], source=str(path))
