"""The one error type road-export raises for bad input: the CLI prints it as one line and exits 2."""


class RoadError(ValueError):
    """Bad input: the message names the file, module or tensor, and says how to fix it."""
