"""Run `sdlm bench` once per settings variant on the same targets, loading the model once.

Each variant is a list of `--set`-style overrides, and variants are separated by `--`. Every
variant is validated before the first one runs. One summary line per variant goes to stdout
as JSON (solved, solved after decode -> re-encode, median seconds and steps to success,
seconds per step), and the full report of variant i is written under OUTPUT/i/. All variants
must use the same model, because it is loaded once. Bad input exits with status 2 and one
line on stderr.

Usage:
    python benchmarks/sweep.py TARGETS [--config BASE.yaml] [--limit N] [--max-seconds S] \\
        [--output DIR] -- prompt.samples=1 optimizer.lr=1.0 -- prompt.samples=4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def split_variants(argv: list[str]) -> tuple[list[str], list[list[str]]]:
    """Split argv at each "--" into the options and one list of overrides per variant."""
    groups: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--":
            groups.append([])
        else:
            groups[-1].append(arg)
    head, *variants = groups
    return head, variants or [[]]


def main(argv: list[str]) -> int:
    head, variants = split_variants(argv)
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="After the options, give each variant as -- KEY=VALUE ...; no variant runs the base config.",
    )
    parser.add_argument("targets", help="JSON samples file (lmi_*.json) or JSONL of target texts")
    parser.add_argument("--config", default=None, help="base sdlm config YAML (default: the built-in defaults)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N targets (N >= 1)")
    parser.add_argument("--max-seconds", type=float, default=40.0, help="wall-clock budget per target and variant")
    parser.add_argument("--output", default="bench-sweep", help="output folder, one subfolder per variant")
    args = parser.parse_args(head)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if not args.max_seconds > 0:
        parser.error(f"--max-seconds must be > 0, got {args.max_seconds}")

    from sdlm import bench
    from sdlm.config import ConfigError

    try:
        targets = bench.load_targets(args.targets)[: args.limit]
        configs = [bench.load_base_config(args.config, overrides) for overrides in variants]
    except (bench.TargetFileError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    specs = {config.model.spec for config in configs}
    if len(specs) > 1:
        print(f"error: the variants name different models {sorted(specs)}; run one sweep per model", file=sys.stderr)
        return 2

    from sdlm.optimize import load_diff_model

    model = load_diff_model(configs[0], compile_default=True)
    for index, (overrides, config) in enumerate(zip(variants, configs)):
        report = bench.run_bench(config, targets, max_seconds=args.max_seconds, model=model)
        bench.write_report([report], Path(args.output) / str(index), bench.machine_info() | {"overrides": overrides})
        summary = report.summary()
        times = sorted(r.solved_at for r in report.results if r.solved_at is not None)
        print(json.dumps({
            "overrides": overrides,
            "solved": summary["solved"],
            "solved_text": summary["solved_text"],
            "median_seconds": summary["median_seconds_to_success"],
            "median_steps": summary["median_steps_to_success"],
            "seconds_per_step": summary["seconds_per_step"],
            "seconds_to_success": [round(t, 1) for t in times],
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
