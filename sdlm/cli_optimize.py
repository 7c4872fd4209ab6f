"""`sdlm optimize`: run the optimization from a config, render its events, write the run directory."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from sdlm.cli_support import (
    CommandError, ExitCode, Overrides, StopRequest, cli_logging, load_with_flags, logger,
    reported_errors,
)
from sdlm.config import ConfigError, dump_config, locate_error



# -- optimize ----------------------------------------------------------------------------


def _flag_overrides(flags: dict[str, tuple[str, object]]) -> dict[str, str]:
    """Map {config key: (flag, value)} to {override: flag as typed}, skipping unset flags.

    For example {"optimizer.steps": ("--steps", 5)} gives {"optimizer.steps=5": "--steps 5"}.
    """
    overrides = {}
    for key, (flag, value) in flags.items():
        if value is None:
            continue
        # A JSON string is a valid YAML scalar, so paths with ':' or '#' stay intact.
        text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)
        overrides[f"{key}={text}"] = f"{flag} {value}"
    return overrides


def _make_renderer(quiet: bool, as_json: bool, stop: StopRequest):
    from rich.console import Console

    from sdlm import render

    if as_json:
        return render.JsonRenderer(sys.stdout)
    if quiet:
        return render.QuietRenderer()
    if sys.stderr.isatty() and os.environ.get("TERM") != "dumb":
        return render.LiveRenderer(Console(stderr=True), stop_requested=stop)
    return render.PlainRenderer(sys.stderr)


def _print_prompt(text: str) -> None:
    """Print the prompt as is for programs, or quoted on a terminal, where control characters
    in the prompt could garble the display and leading spaces would be invisible."""
    from sdlm.render import quote

    print(quote(text) if sys.stdout.isatty() else text, flush=True)


def _exit_code(result, stop: StopRequest) -> ExitCode:
    if result.success:
        return ExitCode.OBJECTIVE_MET
    if result.reason == "interrupted":
        return stop.exit_code
    return ExitCode.OBJECTIVE_NOT_MET


def _resume_config_path(resume: Path, config_path: Path | None, flags: dict[str, tuple[str, object]]) -> Path:
    """Return RUN_DIR/config.yaml for --resume, rejecting flags that would change the run."""
    if config_path is not None:
        raise CommandError(f"give either CONFIG or --resume {resume}, not both (--resume reads {resume / 'config.yaml'})")
    changed = [flag for key, (flag, value) in flags.items() if value is not None and key not in _RESUME_FLAGS]
    if changed:
        raise CommandError(
            f"{changed[0]} cannot be combined with --resume, because a resumed run keeps its config; "
            "only --steps and --device may change"
        )
    path = resume / "config.yaml"
    if not path.is_file():
        raise CommandError(f"--resume {resume}: no config.yaml there; give a run directory that `sdlm optimize` wrote")
    return path


# Config keys that --resume lets a flag change: more steps, or another device.
_RESUME_FLAGS = ("optimizer.steps", "model.device")


def optimize(
    config_path: Annotated[
        Optional[Path],
        typer.Argument(metavar="CONFIG", help="YAML run config, as `sdlm init` writes it (not with --resume).", show_default=False),
    ] = None,
    resume: Annotated[
        Optional[Path],
        typer.Option(
            metavar="RUN_DIR", show_default=False,
            help="Continue the run in RUN_DIR from its latest checkpoint, with its config.yaml. "
            "Only --steps and --device may change.",
        ),
    ] = None,
    device: Annotated[Optional[str], typer.Option(help="Device: auto, cpu, cuda, cuda:N or mps (model.device).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Maximum optimization steps (optimizer.steps).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (seed).")] = None,
    output_dir: Annotated[
        Optional[Path], typer.Option(help="Folder for run directories, relative to the working directory (output_dir).")
    ] = None,
    run_name: Annotated[Optional[str], typer.Option(help="Name of the run directory (run_name).")] = None,
    overrides: Overrides = None,
    force: Annotated[bool, typer.Option("--force", help="Reuse an existing run directory named by run_name.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the final prompt.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Write one JSON object per event to stdout.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Log debug messages and print tracebacks.")] = False,
) -> None:
    """Optimize a prompt as CONFIG describes, writing a run directory.

    The final prompt goes to stdout: as is when redirected, quoted on a terminal. Progress goes
    to stderr: a live view on a terminal, plain lines otherwise, nothing with --quiet.
    """
    with reported_errors(debug):
        flag_values = {
            "model.device": ("--device", device),
            "optimizer.steps": ("--steps", steps),
            "seed": ("--seed", seed),
            "output_dir": ("--output-dir", str(output_dir.absolute()) if output_dir is not None else None),
            "run_name": ("--run-name", run_name),
        }
        if resume is not None:
            if overrides or force:
                raise CommandError("--set and --force cannot be combined with --resume, because a resumed run keeps its config")
            config_path = _resume_config_path(resume, config_path, flag_values)
        elif config_path is None:
            raise CommandError("missing CONFIG: give a config file, or --resume RUN_DIR to continue a run")
        flags = _flag_overrides(flag_values)
        config = load_with_flags(config_path, overrides or [], flags)
        with cli_logging(logging.DEBUG if debug else logging.WARNING):
            try:
                code = _run_optimize(config, config_path, force=force, quiet=quiet, as_json=as_json, resume_dir=resume)
            except ConfigError as error:
                _locate_flag(locate_error(error, config_path, [*(overrides or []), *flags]), flags)
                raise
    raise typer.Exit(code)


def _locate_flag(error: ConfigError, flags: dict[str, str]) -> ConfigError:
    """Name the flag as typed (`--steps 0`) where an override from a flag set the rejected value."""
    override = (error.source or "").removeprefix("--set ")
    if override in flags:
        error.source = flags[override]
    return error


def _as_config_error(error: Exception) -> ConfigError:
    """Turn a model or run directory error into a ConfigError that names its config key."""
    message = str(error)
    if not message.startswith(error.key):
        message = f"{error.key}: {message}"
    return ConfigError(message, key=error.key)


def _open_run(config, config_path: Path, *, force: bool, resume_dir: Path | None):
    """Create the run directory, or open RUN_DIR with its checkpoint for --resume.

    Returns (run, checkpoint or None, whether the directory existed before).
    """
    from sdlm.checkpoint import load_checkpoint
    from sdlm.objectives import CheckResult
    from sdlm.runs import RunDirectory, RunDirectoryError, default_run_name

    if resume_dir is not None:
        checkpoint = load_checkpoint(resume_dir)
        best = checkpoint.state.best
        succeeded = best is not None and CheckResult(**best).meets(config.eval.require_text)
        done = succeeded and config.eval.stop_on_success
        if not done and config.optimizer.steps <= checkpoint.state.step:
            raise CommandError(
                f"--resume {resume_dir}: the checkpoint is at step {checkpoint.state.step} and "
                f"optimizer.steps is {config.optimizer.steps}, so no step is left to run; "
                f"give --steps above {checkpoint.state.step}"
            )
        return RunDirectory(resume_dir), checkpoint, True

    # An explicit run_name must be new unless --force. A derived name gets a -2, -3 ... suffix.
    explicit = config.run_name is not None
    name = config.run_name if explicit else default_run_name(config_path)
    reused = explicit and force and (Path(config.output_dir) / name).exists()
    try:
        run = RunDirectory.create(config.output_dir, name, force=force and explicit, unique=not explicit)
    except RunDirectoryError as error:
        raise _as_config_error(error) from None
    return run, None, reused


def _remove_new_run(run, existed: bool) -> None:
    """Remove a run directory this command made, while it contains no more than its config."""
    if existed:
        return
    with contextlib.suppress(OSError):
        (run.path / "config.yaml").unlink(missing_ok=True)
        run.path.rmdir()  # fails, and so keeps the directory, once the run wrote anything else


def _run_optimize(config, config_path: Path, *, force: bool, quiet: bool, as_json: bool, resume_dir: Path | None) -> ExitCode:
    import sdlm.optimize as optimize_module
    from sdlm.models import ModelLoadError

    run, checkpoint, existed = _open_run(config, config_path, force=force, resume_dir=resume_dir)
    if config.model.trust_remote_code:
        logger.warning("model.trust_remote_code is true: %s may run its own Python code while loading", config.model.spec)

    stop = StopRequest()
    with _make_renderer(quiet, as_json, stop) as renderer, stop.installed():
        stop.immediate = True
        try:
            renderer.loading(config.model.spec, config.model.device)
            model = optimize_module.load_diff_model(config)
            ensemble = []
            for index, spec in enumerate(config.model.ensemble):
                try:
                    ensemble.append(optimize_module.load_diff_model(config, spec))
                except ModelLoadError as error:
                    if error.key == "model.spec":
                        error.key = f"model.ensemble[{index}]"
                    raise
        except ModelLoadError as error:
            _remove_new_run(run, existed)
            raise _as_config_error(error) from None
        except KeyboardInterrupt:
            _remove_new_run(run, existed)
            raise CommandError("interrupted while loading the model, before the first step", stop.exit_code) from None
        except BaseException:
            _remove_new_run(run, existed)
            raise
        stop.immediate = False
        if checkpoint is not None:
            run.truncate_metrics(checkpoint.state.step)
        run.write_config(dump_config(config))
        started = []
        try:
            result = optimize_module.optimize(
                config, model=model, run=run, should_stop=stop, resume=checkpoint, ensemble=ensemble,
                on_event=lambda event: (started.append(True), renderer.handle(event)),
            )
        except ConfigError:
            # A check against the model failed before the first step, so the run directory contains only its config.
            if not started:
                _remove_new_run(run, existed)
            raise
        except KeyboardInterrupt:
            raise CommandError(
                f"interrupted before the run finished. The files written so far are in {run.path}",
                stop.exit_code,
            ) from None

    if not as_json:
        _print_prompt(result.best.prompt_text)
    if result.reason == "interrupted":
        print(
            f"interrupted at step {result.steps}: best prompt saved to {run.path / 'best_prompt.json'}, "
            f"learned prompt to {run.path / 'prompt.safetensors'}, checkpoint to {run.path / 'checkpoint.json'}; "
            f"continue with: sdlm optimize --resume {run.path}",
            file=sys.stderr, flush=True,
        )
    if result.message:
        print(f"{result.message}. The best prompt so far is in {run.path / 'best_prompt.json'}", file=sys.stderr, flush=True)
    return _exit_code(result, stop)


