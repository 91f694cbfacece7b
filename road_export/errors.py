"""The one error type road-export raises for bad input (the CLI prints it as one line and exits 2), the one for an
export that fails on a model road-export takes (ExportBug, exit 3), and the exception a SIGTERM becomes (the CLI
exits 143). Both live here, below every module that raises them, so that
`python -m road_export.cli` (the CLI module loaded twice: as __main__ and as road_export.cli) catches the class
the serving code raises."""


class RoadError(ValueError):
    """Bad input: the message names the file, module or tensor, and says how to fix it. `cli_message`, where set,
    is the same line in the command line's terms (the CLI prints it instead: `--task`, not Python's `task=`)."""

    cli_message: str | None = None


class ExportBug(RuntimeError):
    """torch could not export a model road-export exports, on inputs road-export built for it: a bug of ours, not bad
    input (the CLI exits 3). The message names the model class, the part being traced and where in the model's code
    the trace stopped."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so every writer's cleanup runs."""
