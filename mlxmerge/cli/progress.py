"""Progress bars for the CLI only: silent with --quiet or when stderr is not a terminal."""

from __future__ import annotations

import sys

import click
from tqdm import tqdm


def progress_bar(total: int | None, desc: str, unit: str = "it"):
    ctx = click.get_current_context(silent=True)
    quiet = bool(ctx and ctx.find_root().obj and ctx.find_root().obj.get("quiet"))
    return tqdm(total=total, desc=desc, unit=unit, disable=quiet or not sys.stderr.isatty(),
                leave=False, dynamic_ncols=True)  # fmt: skip


def is_quiet() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().obj and ctx.find_root().obj.get("quiet"))


def labelled_steps(bar, prefix: str = ""):
    """A ``progress(label, done, total)`` callback that restarts ``bar`` for each new label."""
    state = {"label": None}

    def progress(label, done, total):
        if label != state["label"]:
            state["label"] = label
            bar.reset(total=total)
            bar.set_description(f"{prefix}{label}")
        bar.n = done
        bar.refresh()

    return progress
