"""Progress for the CLI only: bars on a terminal, plain lines in a log, nothing with --quiet.

When stderr is not a terminal (nohup, CI, a notebook cell, ``> log 2>&1``) a bar's carriage
returns would pile up or vanish, so each stage prints one line when it starts, a progress line at
most every ``INTERVAL`` seconds (done/total, rate, ETA) and one line when it ends.
"""

from __future__ import annotations

import sys
import time

import click
from tqdm import tqdm

INTERVAL = 15.0  # seconds between progress lines in a log
clock = time.monotonic  # tests swap in a fake clock


def is_quiet() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().obj and ctx.find_root().obj.get("quiet"))


def progress_bar(total: int | None, desc: str, unit: str = "it"):
    """A tqdm bar on a terminal, a ``LineProgress`` otherwise, a silent bar with --quiet."""
    quiet = is_quiet()
    if quiet or sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, disable=quiet, leave=False,
                    dynamic_ncols=True)  # fmt: skip
    return LineProgress(total, desc, unit)


def duration(seconds: float | None) -> str:
    """``4.2s``, ``12s``, ``3m05s``, ``2h10m``; ``?`` for an unknown time."""
    if seconds is None:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _count(n: float) -> str:
    return f"{n:,.0f}" if n >= 100 or n == int(n) else f"{n:.3g}"


class LineProgress:
    """The part of tqdm's interface the CLI uses (``update``, ``reset``, ``set_description``,
    ``n``, ``total``, ``refresh``, ``close``), printed as whole lines to stderr for logs.

    A stage is what runs between two descriptions or resets: a line when it reports its first
    progress, progress lines, a line when it ends."""

    def __init__(self, total: int | None, desc: str, unit: str = "it"):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        # The first line waits for the first progress: a user error found before any work
        # stays the only line printed.
        self._open, self._pending = False, True
        self._seen = clock()  # when progress was last reported: where the next stage starts

    def _echo(self, text: str) -> None:
        click.echo(f"{self.desc}: {text}", err=True)

    def _start(self) -> None:
        # Callbacks come after each batch: a stage began when the last one reported.
        self._open, self._pending = True, False
        self._t0 = self._last = self._seen
        of = f" ({_count(self.total)} {self.unit})" if self.total else ""
        self._echo(f"started{of}")

    def _rate(self, now: float) -> float:
        return self.n / max(now - self._t0, 1e-9)

    def update(self, n: float = 1) -> None:
        self.n += n
        self.refresh()

    def refresh(self) -> None:
        if self._pending:
            self._start()
        now = self._seen = clock()
        if now - self._last < INTERVAL or (self.total and self.n >= self.total):
            return  # too soon, or complete: the closing line follows
        self._last = now
        rate = self._rate(now)
        if self.total:
            eta = duration(max(self.total - self.n, 0) / rate) if rate > 0 else "?"
            self._echo(f"{_count(self.n)}/{_count(self.total)} {self.unit} "
                       f"({100 * self.n / self.total:.0f}%), {rate:.3g} {self.unit}/s, ETA {eta}")  # fmt: skip
        else:
            self._echo(f"{_count(self.n)} {self.unit}, {rate:.3g} {self.unit}/s")

    def _finish(self) -> None:
        if self._open and self.n:  # a stage that did nothing (replaced, or failed) says nothing
            now = clock()
            self._echo(f"done, {_count(self.n)} {self.unit} in {duration(now - self._t0)} "
                       f"({self._rate(now):.3g} {self.unit}/s)")  # fmt: skip
        self._open = False

    def reset(self, total: int | None = None) -> None:
        """End this stage; the next one starts (and says so) at the next update or refresh."""
        self._finish()
        self.total, self.n, self._pending = total, 0, True

    def set_description(self, desc: str) -> None:
        if desc != self.desc:
            self._finish()
            self.desc, self._pending = desc, True

    def close(self) -> None:
        self._finish()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        if exc_type is None:
            self.close()


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
