"""`dictctl`, the command line and the package's one composition root.

Each command parses its arguments, calls one library function and prints the result. Errors are turned
into one readable line by the table `ERROR_MESSAGES` (exit code 1); `DICTIONARIES_DEBUG=1` shows the
traceback instead. `training/` is imported only inside the commands that need it, and torch only where a
command touches tensors, so `dictctl list` answers at once.
"""

import os
import sys

import typer

from dictionaries import cli_cards, cli_hub, cli_models, errors  # noqa: F401 - importing registers the commands
from dictionaries.cli_app import app, err_console
from dictionaries.constants import ENV_DEBUG

__all__ = ["app", "exit_code", "main", "report"]

# error class -> (label, advice); the first class in the table that the error is an instance of wins.
ERROR_MESSAGES: list[tuple[type[BaseException], str, str]] = [
    (errors.UnknownNameError, "unknown name", ""),
    (errors.CardError, "invalid card", "Fix the field named above; `dictctl schema` shows every field."),
    (errors.RegistryError, "invalid registry", ""),
    (errors.HashMismatchError, "hash mismatch", ""),
    (errors.HubUnreachableError, "hub unreachable", ""),
    (errors.MissingFileError, "missing file", ""),
    (errors.ModelMismatchError, "dictionary of another model", ""),
    (errors.ShapeMismatchError, "shape mismatch", ""),
    (errors.HookPointError, "unknown hook point", ""),
    (errors.NotWrappedError, "model not wrapped", ""),
    (errors.FeatureIndexError, "feature out of range", ""),
    (errors.OutsideTraceError, "outside a trace", ""),
    (errors.FormatError, "bad format", ""),
    (errors.ArchitectureMismatchError, "card does not match the dictionary", ""),
    (errors.DtypeDeviceError, "dtype/device mismatch", ""),
    (errors.UnknownPresetError, "unknown preset", ""),
    (errors.RecipeError, "invalid recipe", "Fix the fields named above; `dictctl schema` shows every recipe field."),
    (errors.RepoNameError, "invalid repo name", ""),
    (errors.CardFilesMismatchError, "card does not match files", ""),
    (errors.TargetOccupiedError, "target occupied", ""),
    (errors.HubAuthError, "hub authentication", ""),
    (errors.PublishError, "publish failed", ""),
    (errors.DatasetColumnError, "unknown dataset column", ""),
    (errors.RecipeMismatchError, "checkpoint of another recipe", ""),
    (errors.SharedHarvestError, "recipes cannot share a pass", ""),
    (errors.OutOfDataError, "out of data", ""),
    (errors.NonFiniteLossError, "not finite", ""),
    (errors.EvalInputError, "cannot evaluate", ""),
    (errors.ModelLoadError, "cannot load model", ""),
    (errors.HubPathError, "bad hub path", ""),
    (errors.LocalHubError, "local hub", ""),
    (errors.InvalidArgumentError, "bad argument", ""),
    (errors.DictionariesError, "error", ""),
]


def report(exc: BaseException) -> int:
    """Print an error as one line from the table; return the exit code."""
    for cls, label, advice in ERROR_MESSAGES:
        if isinstance(exc, cls):
            _error_line(label, f"{exc}" + (f" {advice}" if advice else ""))
            return 1
    raise exc


def main() -> None:
    """Entry point of the console script: every failure becomes one line on stderr and a non-zero exit code."""
    try:
        app(standalone_mode=False)
    except BaseException as exc:  # noqa: BLE001 - the one place every failure is turned into an exit code
        sys.exit(exit_code(exc))


def exit_code(exc: BaseException) -> int:
    """Print what went wrong as one line (the traceback too with DICTIONARIES_DEBUG=1) and return the exit code.

    typer carries its own copy of click, so its usage errors are recognised by their interface (`exit_code`,
    `format_message`), not by click's classes; click turns Ctrl-C and EOFError into Abort, whose cause is
    the real failure (an OutOfDataError is an EOFError).
    """
    cause = exc.__cause__ if isinstance(exc, typer.Abort) and exc.__cause__ is not None else exc
    if isinstance(cause, SystemExit):
        return cause.code if isinstance(cause.code, int) else 1
    if isinstance(cause, typer.Exit):
        return cause.exit_code
    if type(cause).__name__ == "NoArgsIsHelpError":  # `dictctl` alone, or a command without its arguments
        cause.show()
        return 0
    if os.environ.get(ENV_DEBUG) == "1":
        raise exc
    if isinstance(cause, errors.DictionariesError):
        return report(cause)
    if isinstance(cause, KeyboardInterrupt) or isinstance(exc, typer.Abort):
        _error_line("interrupted", "stopped by the user (a training run continues with --resume)")
        return 130
    if hasattr(cause, "format_message") and hasattr(cause, "exit_code"):  # click's usage errors
        ctx = getattr(cause, "ctx", None)
        command = ctx.command_path if ctx is not None else "dictctl"
        _error_line("usage", f"{cause.format_message()} (`{command} --help` shows the usage)")
        return 1
    _error_line("internal error", f"{type(cause).__name__}: {cause} (set {ENV_DEBUG}=1 for the traceback)")
    return 1


def _error_line(label: str, message: str) -> None:
    one_line = " ".join(str(message).split())
    err_console.print(f"[bold red]{label}:[/] {one_line}", highlight=False, soft_wrap=True, markup=True)


if __name__ == "__main__":
    main()
