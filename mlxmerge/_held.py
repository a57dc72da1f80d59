"""A process-wide setting held while any thread runs inside a block."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager


def held_setting(apply: Callable[[], object], restore: Callable[[object], None]):
    """A context manager: the first thread to enter calls ``apply()`` (which returns what to
    restore), the last one to leave calls ``restore(that)``. Merges overlapping in two threads
    keep the setting until both are done, and then get back what was there before either."""
    lock = threading.Lock()
    state = {"count": 0, "saved": None}

    @contextmanager
    def block():
        with lock:
            if state["count"] == 0:
                state["saved"] = apply()
            state["count"] += 1
        try:
            yield
        finally:
            with lock:
                state["count"] -= 1
                if state["count"] == 0:
                    restore(state["saved"])

    return block
