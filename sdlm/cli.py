"""The `sdlm` command line: optimize, validate, init, generate and bench.

The commands only parse flags, call the library and render what it returns, because the
optimization itself lives in `sdlm.optimize`. Results go to stdout. Progress, logs and errors
go to stderr.

Exit codes (`ExitCode`):

    0    the objective was met (other commands: success)
    1    the run ended without meeting the objective
    2    invalid config, arguments, model or run directory
    3    an unexpected error (rerun with --debug for the traceback)
    130  interrupted by SIGINT (Ctrl-C), with the best prompt so far and a checkpoint saved
    143  stopped by SIGTERM, with the same files saved
"""

from __future__ import annotations

import os
import signal
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated

import typer

from sdlm.cli_bench import bench
from sdlm.cli_generate import generate
from sdlm.cli_optimize import optimize
from sdlm.cli_support import (
    CommandError, ConfigPath, EXIT_CODES_HELP, ExitCode, Overrides, PARSER_ERRORS, StopRequest,
    load_with_flags, print_error, reported_errors,
)
from sdlm.config import TEMPLATES, dump_config, starter_config_yaml


__all__ = ["ExitCode", "StopRequest", "app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Optimize prompts of causal language models by gradient descent through "
    "Straight-Through Gumbel-Softmax samples.",
    epilog=EXIT_CODES_HELP,
)


# -- shared options ----------------------------------------------------------------------


def _show_version(value: bool) -> None:
    if value:
        try:
            print(f"sdlm {version('sdlm')}")
        except PackageNotFoundError:
            print("sdlm (version unknown: the package is not installed)")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


# -- commands defined in their own modules ------------------------------------------------

app.command(epilog=EXIT_CODES_HELP)(optimize)
app.command()(generate)
app.command(epilog="Exit codes: 0 every target solved, 1 some not solved, 2 invalid input, 3 unexpected error.")(bench)


# -- validate and init -------------------------------------------------------------------


@app.command()
def validate(config_path: ConfigPath, overrides: Overrides = None) -> None:
    """Check CONFIG and print the resolved config as YAML (exit 0), or the first error (exit 2)."""
    with reported_errors(debug=False):
        config = load_with_flags(config_path, overrides or [])
    sys.stdout.write(dump_config(config))


@app.command()
def init(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="Where to write the new config file.", show_default=False)],
    template: Annotated[
        str, typer.Option(help=f"Starter config: {', '.join(TEMPLATES)}.")
    ] = "quickstart",
    force: Annotated[bool, typer.Option("--force", help="Overwrite PATH if it exists.")] = False,
) -> None:
    """Write a commented starter config to PATH; an existing file is kept unless --force."""
    with reported_errors(debug=False):
        text = starter_config_yaml(template)
        if path.is_dir():
            raise CommandError(f"{path} is a directory (give a file path such as {path / 'config.yaml'})")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w" if force else "x", encoding="utf-8") as file:
                file.write(text)
        except FileExistsError:
            raise CommandError(f"{path} already exists (pass --force to overwrite it)") from None
        except OSError as error:
            raise CommandError(f"cannot write {path}: {error.strerror}") from None
    print(f"wrote {path} (template {template}); run it with: sdlm optimize {path}", file=sys.stderr)


# -- entry point -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on argv (default: sys.argv[1:]) and return its exit code.

    Usage errors print one `error:` line and return 2; no arguments at all print the help.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        app(args=["--help"], prog_name="sdlm", standalone_mode=False)
        return ExitCode.INVALID_INPUT
    try:
        code = app(args=args, prog_name="sdlm", standalone_mode=False)
    except PARSER_ERRORS as error:
        context = getattr(error, "ctx", None)
        hint = f" (see '{context.command_path} --help')" if context is not None else ""
        print_error(error.format_message() + hint)
        return error.exit_code
    except typer.Abort:
        print_error("aborted")
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away, as in `sdlm validate c.yaml | head -1`, so exit quietly
        # with 141 (128 + SIGPIPE), the status a shell reports for a process that SIGPIPE ended.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
