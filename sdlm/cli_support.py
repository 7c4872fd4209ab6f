"""Shared pieces of the `sdlm` commands: exit codes, one-line errors, logging, signals, config loading."""

from __future__ import annotations

import contextlib
import enum
import logging
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from sdlm.config import (
    ConfigError, load_config,
)


class ExitCode(enum.IntEnum):
    OBJECTIVE_MET = 0
    OBJECTIVE_NOT_MET = 1
    INVALID_INPUT = 2
    UNEXPECTED_ERROR = 3
    INTERRUPTED = 130
    TERMINATED = 143


EXIT_CODES_HELP = (
    "Exit codes: 0 objective met, 1 ran to the end without meeting it, 2 invalid config or "
    "arguments, 3 unexpected error, 130 interrupted by Ctrl-C and 143 by SIGTERM (the best prompt "
    "so far and a checkpoint are saved)."
)

logger = logging.getLogger("sdlm")

# Usage errors of the argument parser. Recent typer releases (0.29 here) raise their own copy
# of click's exceptions, all derived from TyperException, and older releases raise click's.
if hasattr(typer, "TyperException"):
    PARSER_ERRORS: tuple[type[Exception], ...] = (typer.TyperException,)
else:  # pragma: no cover
    import click

    PARSER_ERRORS = (click.ClickException,)


# -- errors, logging and signals ---------------------------------------------------------


class CommandError(Exception):
    """An error the CLI reports as one line `error: ...` with an exit code."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.INVALID_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _expected_errors() -> tuple[type[Exception], ...]:
    """Return the exception types of bad input (exit 2) besides ConfigError.

    They are imported here because sdlm.models imports transformers, which `sdlm --help`,
    `validate` and `init` do without.
    """
    from sdlm.checkpoint import CheckpointError
    from sdlm.models import ModelLoadError
    from sdlm.runs import RunDirectoryError

    return (ConfigError, ModelLoadError, RunDirectoryError, CheckpointError)


def print_error(message: str) -> None:
    print("error: " + " ".join(str(message).splitlines()), file=sys.stderr, flush=True)


@contextlib.contextmanager
def reported_errors(debug: bool) -> Iterator[None]:
    """Turn exceptions into one-line messages and exit codes. With `debug`, also print tracebacks."""
    try:
        yield
    except (typer.Exit, BrokenPipeError, *PARSER_ERRORS):
        raise
    except CommandError as error:
        print_error(str(error))
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        print_error("interrupted")
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    except Exception as error:
        if debug:
            traceback.print_exc()
        if isinstance(error, ConfigError) or isinstance(error, _expected_errors()):
            print_error(str(error))
            raise typer.Exit(ExitCode.INVALID_INPUT) from None
        print_error(f"unexpected {type(error).__name__}: {error} (rerun with --debug for the traceback)")
        raise typer.Exit(ExitCode.UNEXPECTED_ERROR) from None


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to the current sys.stderr, which rich and test runners replace."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _LowercaseLevelFormatter(logging.Formatter):
    """Write "warning: ..." like the CLI's own "error: ..." lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).replace(record.levelname, record.levelname.lower(), 1)


@contextlib.contextmanager
def cli_logging(level: int) -> Iterator[None]:
    """Send the "sdlm" logger to stderr, and silence transformers' warnings and progress bars."""
    from transformers.utils import logging as hf_logging

    handler = _StderrHandler()
    handler.setFormatter(_LowercaseLevelFormatter("%(levelname)s: %(message)s"))
    previous_level = logger.level
    hf_verbosity = hf_logging.get_verbosity()
    hf_bars = hf_logging.is_progress_bar_enabled()
    logger.addHandler(handler)
    logger.setLevel(level)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        hf_logging.set_verbosity(hf_verbosity)
        if hf_bars:
            hf_logging.enable_progress_bar()


class StopRequest:
    """A SIGINT and SIGTERM handler for the optimization loop, and the `should_stop` that polls it.

    The first signal requests the loop to stop at the end of the current step, so the best
    prompt, the learned string and a checkpoint are saved. A second signal raises
    KeyboardInterrupt at once. Every file of a run is replaced atomically, so that leaves each
    file at its previous complete version. The handler only sets a flag, because writing output
    from a signal handler can interleave with a write in progress.

    While `immediate` is True (the model is loading and nothing needs saving), the first signal
    raises KeyboardInterrupt at once too.

    NOTE: the loop polls the flag between steps, so a step or check that takes minutes (a
    target of thousands of tokens) delays the stop until it ends, with nothing printed meanwhile.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.immediate = False
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.requested

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.TERMINATED if self.signum == signal.SIGTERM else ExitCode.INTERRUPTED

    def handle_signal(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        if self.immediate:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        """Handle the signals inside the block, in the main thread only, because Python allows no other."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.signal(signum, self.handle_signal) for signum in self.SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


ConfigPath = Annotated[
    Path, typer.Argument(metavar="CONFIG", help="YAML run config, as `sdlm init` writes it.", show_default=False)
]
Overrides = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set", metavar="KEY=VALUE", show_default=False,
        help="Override one config key for this run, such as --set optimizer.lr=0.1. Repeatable.",
    ),
]


def load_with_flags(config_path: Path, overrides: list[str], flags: dict[str, str] | None = None):
    """Load the config with the --set overrides, then the flag overrides, which take precedence.

    flags: override text -> the flag as typed, so an error names `--steps 0`, not the key.
    """
    flags = flags or {}
    try:
        return load_config(config_path, [*overrides, *flags])
    except ConfigError as error:
        override = (error.source or "").removeprefix("--set ")
        if override in flags:
            error.source = flags[override]
        raise


