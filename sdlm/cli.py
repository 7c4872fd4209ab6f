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

import contextlib
import enum
import json
import logging
import os
import signal
import sys
import threading
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from sdlm.config import (
    EMBEDDED_MODEL, TEMPLATES, ConfigError, dump_config, load_config, locate_error, starter_config_yaml,
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

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Optimize prompts of causal language models by gradient descent through "
    "Straight-Through Gumbel-Softmax samples.",
    epilog=EXIT_CODES_HELP,
)

logger = logging.getLogger("sdlm")

# Usage errors of the argument parser. Recent typer releases (0.29 here) raise their own copy
# of click's exceptions, all derived from TyperException, and older releases raise click's.
if hasattr(typer, "TyperException"):
    _PARSER_ERRORS: tuple[type[Exception], ...] = (typer.TyperException,)
else:  # pragma: no cover
    import click

    _PARSER_ERRORS = (click.ClickException,)


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


def _error(message: str) -> None:
    print("error: " + " ".join(str(message).splitlines()), file=sys.stderr, flush=True)


@contextlib.contextmanager
def _reported_errors(debug: bool) -> Iterator[None]:
    """Turn exceptions into one-line messages and exit codes. With `debug`, also print tracebacks."""
    try:
        yield
    except (typer.Exit, BrokenPipeError, *_PARSER_ERRORS):
        raise
    except CommandError as error:
        _error(str(error))
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        _error("interrupted")
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    except Exception as error:
        if debug:
            traceback.print_exc()
        if isinstance(error, ConfigError) or isinstance(error, _expected_errors()):
            _error(str(error))
            raise typer.Exit(ExitCode.INVALID_INPUT) from None
        _error(f"unexpected {type(error).__name__}: {error} (rerun with --debug for the traceback)")
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
def _cli_logging(level: int) -> Iterator[None]:
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


def _load(config_path: Path, overrides: list[str], flags: dict[str, str] | None = None):
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


@app.command(epilog=EXIT_CODES_HELP)
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
    with _reported_errors(debug):
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
        config = _load(config_path, overrides or [], flags)
        with _cli_logging(logging.DEBUG if debug else logging.WARNING):
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
    from sdlm.runs import RunDirectory, RunDirectoryError, default_run_name

    if resume_dir is not None:
        return RunDirectory(resume_dir), load_checkpoint(resume_dir), True

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
                config, model=model, run=run, should_stop=stop, resume=checkpoint,
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


# -- validate and init -------------------------------------------------------------------


@app.command()
def validate(config_path: ConfigPath, overrides: Overrides = None) -> None:
    """Check CONFIG and print the resolved config as YAML (exit 0), or the first error (exit 2)."""
    with _reported_errors(debug=False):
        config = _load(config_path, overrides or [])
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
    with _reported_errors(debug=False):
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


# -- generate ----------------------------------------------------------------------------


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise CommandError("give exactly one of --prompt TEXT and --prompt-file FILE")
    if prompt is not None:
        return prompt
    try:
        text = prompt_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise CommandError(f"cannot read --prompt-file {prompt_file}: {reason}") from None
    # Files usually end with one line break that is not part of the prompt.
    return text[:-1] if text.endswith("\n") else text


@app.command()
def generate(
    model_spec: Annotated[
        str, typer.Option("--model", help="Model: smollm2 (embedded), a model directory, a .gguf file or a cached hub id.")
    ] = EMBEDDED_MODEL,
    prompt: Annotated[Optional[str], typer.Option(help="Prompt text, encoded with no special tokens.")] = None,
    prompt_file: Annotated[
        Optional[Path], typer.Option(help="File with the prompt text. One final line break is dropped.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Number of tokens to generate.")] = 20,
    temperature: Annotated[
        float, typer.Option(min=0, help="STGS relaxation temperature of the soft samples fed back with --soft.")
    ] = 1.0,
    noise_scale: Annotated[
        Optional[float],
        typer.Option(min=0, help="Gumbel noise multiplier: tokens are drawn as if from softmax(logits / noise_scale). Default 1."),
    ] = None,
    hard: Annotated[
        Optional[bool], typer.Option("--hard/--soft", help="Feed back one-hot tokens (default) or the soft samples.")
    ] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Pick the most likely token each step (noise scale 0), as HF greedy decoding.")] = False,
    seed: Annotated[Optional[int], typer.Option(min=0, help="Seed of the Gumbel noise. Without it, each run draws new noise.")] = None,
    num_samples: Annotated[int, typer.Option(min=1, help="Number of samples generated as one batch.")] = 1,
    device: Annotated[str, typer.Option(help="Device: auto, cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Weight type: float32, bfloat16 or float16.")] = "float32",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow a hub model to run its own code while loading.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the prompt and the samples.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Log debug messages and print tracebacks.")] = False,
) -> None:
    """Generate continuations of a prompt through STGS sampling, as the optimizer runs the model.

    Generation stops at the end-of-sequence token. Samples go to stdout, separated by header
    lines when there are several.
    """
    with _reported_errors(debug):
        text = _read_prompt(prompt, prompt_file)
        if temperature <= 0:
            raise CommandError(f"--temperature must be > 0, got {temperature}")
        if greedy and hard is False:
            raise CommandError("--greedy cannot be combined with --soft, because greedy decoding feeds back hard tokens")
        if greedy and noise_scale not in (None, 0):
            raise CommandError(f"--greedy sets the noise scale to 0, so it cannot be combined with --noise-scale {noise_scale:g}; drop one")
        noise_scale = 1.0 if noise_scale is None else noise_scale
        with _cli_logging(logging.DEBUG if debug else logging.WARNING):
            if trust_remote_code:
                logger.warning("--trust-remote-code is on: %s may run its own Python code while loading", model_spec)
            samples, prompt_ids = _generate(
                text, model_spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                max_new_tokens=max_new_tokens, temperature=temperature, hard=hard is not False,
                noise_scale=0.0 if greedy else noise_scale, seed=seed, num_samples=num_samples,
            )

    if as_json:
        print(json.dumps({"model": model_spec, "prompt": text, "prompt_ids": prompt_ids, "samples": samples}, ensure_ascii=False))
        return
    for index, sample in enumerate(samples, start=1):
        if len(samples) > 1:
            print(f"=== sample {index} of {len(samples)} ===")
        print(sample["text"])


def _generate(
    text: str, model_spec: str, *, device: str, dtype: str, trust_remote_code: bool, max_new_tokens: int,
    temperature: float, hard: bool, noise_scale: float, seed: int | None, num_samples: int,
) -> tuple[list[dict], list[int]]:
    """Load the model and generate. Returns the samples ({"text", "ids"}) and the prompt ids."""
    import torch

    import sdlm.models as models_module
    from sdlm.stgs import STGS
    from sdlm.stgs_diff_model import STGSDiffModel

    hf_model, tokenizer = models_module.load_model(model_spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    model = STGSDiffModel(hf_model, tokenizer, stgs=STGS(temperature=temperature, hard=hard, noise_scale=noise_scale))
    prompt_ids = model.encode(text)  # (1, T)
    if prompt_ids.shape[1] == 0:
        raise CommandError("the prompt is empty (give at least one token of text)")

    generator = torch.Generator(device=model.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            parts=[prompt_ids.expand(num_samples, -1)], max_new_tokens=max_new_tokens,
            stop_at_eos=True, generator=generator,
        )
    samples = [
        {"text": sample_text, "ids": row[: int(length)].tolist()}
        for sample_text, row, length in zip(out.text, out.ids, out.lengths)
    ]
    return samples, prompt_ids[0].tolist()


# -- bench -------------------------------------------------------------------------------


@app.command(epilog="Exit codes: 0 every target solved, 1 some not solved, 2 invalid input, 3 unexpected error.")
def bench(
    targets_path: Annotated[
        Path, typer.Argument(metavar="TARGETS", help="JSON file of inversion samples (lmi_*.json) or JSONL of target texts.", show_default=False)
    ],
    config_path: Annotated[
        Optional[Path], typer.Option("--config", help="Base YAML config for every target; its target is ignored. Default: the built-in defaults.")
    ] = None,
    overrides: Overrides = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use only the first N targets.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Maximum steps per target (default optimizer.steps).")] = None,
    max_seconds: Annotated[Optional[float], typer.Option(min=0.001, help="Wall-clock budget per target, in seconds.")] = None,
    output: Annotated[Path, typer.Option(help="Folder for results.json, results.md and solved_vs_seconds.png.")] = Path("bench-results"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the results table.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Log debug messages and print tracebacks.")] = False,
) -> None:
    """Optimize a prompt for each target in TARGETS with one config and budget, and summarise.

    Success is the check of `sdlm optimize`: greedy generation from the prompt ids reproduces
    the target. The tables also count the prompts that still work after decode -> re-encode.
    The results table goes to stdout. Progress goes to stderr: a progress bar on a terminal,
    one line per target otherwise.
    """
    with _reported_errors(debug):
        from sdlm import bench as bench_module

        try:
            targets = bench_module.load_targets(targets_path)[:limit]
        except bench_module.TargetFileError as error:
            raise CommandError(str(error)) from None
        config = bench_module.load_base_config(config_path, overrides or [])
        with _cli_logging(logging.DEBUG if debug else logging.WARNING):
            report = _run_bench(config, targets, max_steps=max_steps, max_seconds=max_seconds, output=output, quiet=quiet)
    solved = report.summary()["solved"]
    raise typer.Exit(ExitCode.OBJECTIVE_MET if solved == len(targets) else ExitCode.OBJECTIVE_NOT_MET)


def _run_bench(config, targets, *, max_steps, max_seconds, output: Path, quiet: bool):
    import sdlm.optimize as optimize_module
    from sdlm import bench as bench_module
    from sdlm.bench_render import LiveBenchRenderer, PlainBenchRenderer, QuietBenchRenderer

    if quiet:
        renderer = QuietBenchRenderer()
    elif sys.stderr.isatty() and os.environ.get("TERM") != "dumb":
        from rich.console import Console

        renderer = LiveBenchRenderer(Console(stderr=True))
    else:
        renderer = PlainBenchRenderer(sys.stderr)
    with renderer:
        renderer.loading(config.model.spec)
        model = optimize_module.load_diff_model(config)
        report = bench_module.run_bench(
            config, targets, max_steps=max_steps, max_seconds=max_seconds, model=model, on_event=renderer.handle
        )
    meta = bench_module.machine_info() | {"command": " ".join(["sdlm", *sys.argv[1:]])}
    paths = bench_module.write_report([report], output, meta)
    print(paths["markdown"].read_text(), end="", flush=True)
    print(f"results written to {output}", file=sys.stderr, flush=True)
    return report


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
    except _PARSER_ERRORS as error:
        context = getattr(error, "ctx", None)
        hint = f" (see '{context.command_path} --help')" if context is not None else ""
        _error(error.format_message() + hint)
        return error.exit_code
    except typer.Abort:
        _error("aborted")
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away, as in `sdlm validate c.yaml | head -1`, so exit quietly
        # with 141 (128 + SIGPIPE), the status a shell reports for a process that SIGPIPE ended.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
