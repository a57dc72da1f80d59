"""Exceptions for user-facing failures; the CLI turns each into a one-line ``Error: ...``."""


class MlxmergeError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class CheckpointError(MlxmergeError):
    """A checkpoint file, index or config is missing, malformed or inconsistent."""


class RecipeError(MlxmergeError):
    """A merge recipe or merge parameters are invalid."""


class OutputError(MlxmergeError):
    """The output location cannot be used."""


class NonFiniteError(MlxmergeError):
    """A tensor read or about to be written holds NaN or Inf entries."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so that cleanups run."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name
