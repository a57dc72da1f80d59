"""``--compute-dtype``: one option for every verb that runs forward passes (lm.compute decides)."""

from __future__ import annotations

import functools
import logging

import click

from mlxmerge.cli.progress import is_quiet
from mlxmerge.lm.compute import COMPUTE_DTYPES, compute_dtype


def compute_dtype_option(fn):
    """Add ``--compute-dtype`` to a command and run it under that setting."""

    @functools.wraps(fn)
    def command(*args, compute_dtype_name: str = "auto", **kw):
        if not is_quiet():  # the one line saying what the cast did and what it costs
            logging.getLogger("mlxmerge.lm.compute").setLevel(logging.INFO)
        with compute_dtype(compute_dtype_name):
            return fn(*args, **kw)

    return click.option(
        "--compute-dtype", "compute_dtype_name", type=click.Choice(COMPUTE_DTYPES),
        default="auto", show_default=True,
        help="Dtype of the forward passes; auto: float32 on a CPU for bf16/fp16 weights (MLX's "
        "CPU matmul is fast in float32 only), as stored on a GPU. Written weights keep theirs.",
    )(command)  # fmt: skip
