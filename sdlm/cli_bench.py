"""`sdlm bench`: optimize every target of an inversion file and report how many were solved."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from sdlm.cli_support import CommandError, ExitCode, Overrides, cli_logging, reported_errors



# -- bench -------------------------------------------------------------------------------


def bench(
    targets_path: Annotated[
        Path,
        typer.Argument(
            metavar="TARGETS",
            help=(
                "JSON file of inversion samples (lmi_*.json), or JSONL with one target per line: a JSON "
                'string, or an object with "target_text" and optionally "id".'
            ),
            show_default=False,
        ),
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
    the target, and by default (eval.require_text) so does the prompt's text after decode ->
    re-encode. The tables also count the prompts whose text works.
    The results table goes to stdout. Progress goes to stderr: a progress bar on a terminal,
    one line per target otherwise.
    """
    with reported_errors(debug):
        from sdlm import bench as bench_module

        try:
            targets = bench_module.load_targets(targets_path)[:limit]
        except bench_module.TargetFileError as error:
            raise CommandError(str(error)) from None
        config = bench_module.load_base_config(config_path, overrides or [])
        with cli_logging(logging.DEBUG if debug else logging.WARNING):
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
        model = optimize_module.load_diff_model(config, compile_default=True)
        report = bench_module.run_bench(
            config, targets, max_steps=max_steps, max_seconds=max_seconds, model=model, on_event=renderer.handle
        )
    meta = bench_module.machine_info() | {"command": " ".join(["sdlm", *sys.argv[1:]])}
    paths = bench_module.write_report([report], output, meta)
    print(paths["markdown"].read_text(), end="", flush=True)
    print(f"results written to {output}", file=sys.stderr, flush=True)
    return report


