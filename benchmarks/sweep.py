"""Run `sdlm bench` once per settings variant on the same targets, loading the model once.

Each variant is a list of `--set`-style overrides; variants are separated by `--`. One
summary line per variant goes to stdout (solved, solved after decode -> re-encode, median
seconds and steps to success, seconds per step), and the full report of each variant is
written under OUTPUT/<index>/.

Usage:
    python benchmarks/sweep.py TARGETS --max-seconds 40 [--limit N] [--output DIR] \
        -- prompt.samples=1 optimizer.lr=1.0 -- prompt.samples=4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    # Split argv at each "--": the options come first, then one list of overrides per variant.
    groups: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--":
            groups.append([])
        else:
            groups[-1].append(arg)
    head, *variants = groups

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets")
    parser.add_argument("--config", default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-seconds", type=float, default=40.0)
    parser.add_argument("--output", default="bench-sweep")
    args = parser.parse_args(head)

    from sdlm import bench
    from sdlm.optimize import load_diff_model

    targets = bench.load_targets(args.targets)[: args.limit]
    model = None
    for index, overrides in enumerate(variants or [[]]):
        config = bench.load_base_config(args.config, overrides)
        model = model or load_diff_model(config)
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


if __name__ == "__main__":
    main(sys.argv[1:])
