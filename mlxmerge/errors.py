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
