"""Run sdlm and GCG (nanoGCG) side by side on the same targets, model, machine and budget.

Both methods get the exact target token ids, the same prompt length, the same per-target
wall-clock budget and the same success check, `TargetObjective.check`. Greedy generation from
the prompt ids must reproduce the target, and under eval.require_text (the default) so must the
prompt's text after decode -> re-encode. The text result is reported either way. The model is
loaded once and shared. Writes results.json, results.md and solved_vs_seconds.png.

GCG comes from nanoGCG 0.3.0, used as a library: its own `GCG.run` loop does the search. Two
hooks adapt it without changing the algorithm. A subclass swaps in the exact target ids once
`run` has tokenized the target text, and a buffer subclass checks the best prompt after each
step, which also ends the run at success or at the time budget. The prompt is bare, so the
chat template passes the text through and the prefix cache is off (there is no prefix).

nanoGCG 0.3.0 declares transformers<=4.47.1 but runs on transformers 5.x. Install it with
    pip install --no-deps nanogcg==0.3.0 scipy sentencepiece protobuf

Usage:
    python benchmarks/compare_gcg.py TARGETS [--config BASE.yaml] [--limit N]
        [--max-seconds S] [--max-steps N] [--output DIR] [--search-width 128] [--topk 64]
        [--methods sdlm,gcg] [--gcg-init x|target]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # nanoGCG draws a tqdm bar per run

# The passthrough template makes the chat input exactly the optimized string.
PASSTHROUGH_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def start_text(tokenizer, init: str, target_ids: list[int], prompt_length: int) -> str:
    """Return GCG's start string: "x x ... x" (init "x"), or the target's first tokens (init
    "target", as sdlm's `search.polish_from: target` starts) when the target has at least
    prompt_length tokens and their text encodes back to that many, else "x x ... x". Unlike
    sdlm, which fills such gaps token by token, GCG then starts from "x x ... x"."""
    x_text = "x" + " x" * (prompt_length - 1)
    if init == "target":
        copy_text = tokenizer.decode(list(target_ids)[:prompt_length], clean_up_tokenization_spaces=False)
        if len(tokenizer.encode(copy_text, add_special_tokens=False)) == prompt_length:
            return copy_text
    return x_text


def run_gcg_bench(dm, targets, *, prompt_length: int, max_seconds: float | None, max_steps: int | None,
                  search_width: int, topk: int, seed: int, require_text: bool = True, init: str = "x",
                  on_event=None):
    """Run GCG on each target with the sdlm success check, and return a sdlm.bench.MethodReport.

    require_text: a success needs the prompt's text to work too, as eval.require_text does for sdlm.
    init: the start string, "x" or "target" (see start_text).
    """
    import torch
    from nanogcg.gcg import GCG, AttackBuffer, GCGConfig

    from sdlm.bench import MethodReport, TargetFinished, TargetResult, TargetStarted, peak_memory_mb
    from sdlm.objectives import TargetObjective

    emit = on_event or (lambda event: None)
    tokenizer = copy.deepcopy(dm.tokenizer)  # nanoGCG may set a chat template on it
    tokenizer.chat_template = PASSTHROUGH_TEMPLATE
    x_ids = tokenizer.encode(start_text(tokenizer, "x", [], prompt_length), add_special_tokens=False)
    if len(x_ids) != prompt_length:
        raise ValueError(f"the GCG start string encodes to {len(x_ids)} tokens, expected {prompt_length}")

    results = []
    starts = {}
    for index, target in enumerate(targets):
        emit(TargetStarted(method="gcg", index=index, total=len(targets), target_id=target.id))
        target_ids = target.target_ids or dm.tokenizer.encode(target.target_text, add_special_tokens=False)
        objective = TargetObjective(dm, target_ids)
        start_string = start_text(tokenizer, init, target_ids, prompt_length)
        starts[target.id] = start_string
        state = {"best": None, "checked": set(), "steps": 0, "solved_at": None, "last": None}
        start = time.perf_counter()

        class CheckedBuffer(AttackBuffer):
            """A buffer that checks its best prompt after each GCG step and stops the run."""

            def log_buffer(self, tokenizer):
                state["steps"] += 1
                ids = tuple(self.get_best_ids()[0].tolist())
                if ids not in state["checked"]:
                    state["checked"].add(ids)
                    check = objective.check(list(ids))
                    best = state["best"]
                    if best is None or (check.meets(require_text), check.token_accuracy, check.lcs_ratio) > (
                        best.meets(require_text), best.token_accuracy, best.lcs_ratio
                    ):
                        state["best"] = check
                    if check.meets(require_text) and state["solved_at"] is None:
                        state["solved_at"] = time.perf_counter() - start
                        gcg.stop_flag = True
                out_of_time = max_seconds is not None and time.perf_counter() - start >= max_seconds
                out_of_steps = max_steps is not None and state["steps"] >= max_steps
                if out_of_time or out_of_steps:
                    gcg.stop_flag = True

        class ExactTargetGCG(GCG):
            """GCG scored on the exact target ids; its buffer runs the success check."""

            def init_buffer(self):
                self.target_ids = torch.tensor([target_ids], device=self.model.device)
                self.target_embeds = self.embedding_layer(self.target_ids)
                buffer = super().init_buffer()
                checked = CheckedBuffer(buffer.size)
                checked.buffer = buffer.buffer
                return checked

        config = GCGConfig(
            num_steps=max_steps or 1_000_000, optim_str_init=start_string, search_width=search_width,
            topk=topk, use_prefix_cache=False, early_stop=False, verbosity="WARNING",
        )
        torch.manual_seed(seed)
        gcg = ExactTargetGCG(dm.model, tokenizer, config)
        gcg.run("{optim_str}", objective.target_text)
        seconds = time.perf_counter() - start
        best = state["best"]
        result = TargetResult(
            method="gcg", target_id=target.id, target_text=objective.target_text, success=best.meets(require_text),
            text_success=best.text_success, steps=state["steps"], seconds=seconds, solved_at=state["solved_at"],
            prompt_text=best.prompt_text, prompt_ids=best.prompt_ids, token_accuracy=best.token_accuracy,
            lcs_ratio=best.lcs_ratio,
        )
        results.append(result)
        emit(TargetFinished(method="gcg", index=index, total=len(targets), result=result))
    settings = {"search_width": search_width, "topk": topk, "max_seconds": max_seconds, "max_steps": max_steps,
                "require_text": require_text,
                "nanogcg": _version("nanogcg"), "init": init, "start_strings": starts}
    return MethodReport(method="gcg", settings=settings, results=results, peak_memory_mb=peak_memory_mb(str(dm.device)))


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def print_event(event) -> None:
    from sdlm.bench_render import target_line

    if event.kind == "target_end":
        print(target_line(event), file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", help="JSON samples file (lmi_*.json) or JSONL of target texts")
    parser.add_argument("--config", help="base sdlm config YAML (default: the built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--limit", type=int, help="use only the first N targets")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="wall-clock budget per target and method")
    parser.add_argument("--max-steps", type=int, help="step limit per target and method")
    parser.add_argument("--output", default="bench-gcg", help="output folder")
    parser.add_argument("--search-width", type=int, default=128, help="GCG candidates per step")
    parser.add_argument("--topk", type=int, default=64, help="GCG top-k tokens per position")
    parser.add_argument("--methods", default="sdlm,gcg", help="comma-separated methods to run, in order")
    parser.add_argument("--gcg-init", choices=["x", "target"], default="x",
                        help='GCG start: "x x ... x", or the target\'s first tokens as in sdlm\'s polish_from target')
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    from sdlm.bench import TargetFinished, load_base_config, load_targets, machine_info, run_bench, warm_up, write_report
    from sdlm.bench_render import WARM_UP_LINE
    from sdlm.optimize import load_diff_model

    config = load_base_config(args.config, args.set)
    if config.model.ensemble:
        raise SystemExit("compare_gcg.py compares methods on one model; remove model.ensemble from the config")
    targets = load_targets(args.targets)[: args.limit]
    dm = load_diff_model(config, compile_default=True)
    prompt_lengths = {t.prompt_length or config.prompt.length for t in targets}
    if len(prompt_lengths) != 1:
        raise SystemExit(f"targets have different prompt lengths {sorted(prompt_lengths)}; compare one length at a time")

    # Interleave the methods target by target, so load from other processes on a shared
    # machine falls on both alike. The report is rewritten after each target.
    from sdlm.bench import MethodReport

    methods = args.methods.split(",")
    for method in methods:
        if method not in ("sdlm", "gcg"):
            raise SystemExit(f"unknown method {method!r}; use sdlm and/or gcg")
    reports = {method: MethodReport(method=method, settings={}, results=[]) for method in methods}
    meta = machine_info() | {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "targets_file": args.targets}
    if "sdlm" in methods and dm.compiled:
        print(f"[sdlm] {WARM_UP_LINE}", file=sys.stderr, flush=True)
        warm_up(config, targets, dm)
    for index, target in enumerate(targets):
        for method in methods:
            if method == "sdlm":
                part = run_bench(config, [target], max_steps=args.max_steps, max_seconds=args.max_seconds, model=dm, warm=False)
            else:
                part = run_gcg_bench(dm, [target], prompt_length=next(iter(prompt_lengths)), max_seconds=args.max_seconds,
                                     max_steps=args.max_steps, search_width=args.search_width, topk=args.topk,
                                     seed=config.seed, require_text=config.eval.require_text, init=args.gcg_init)
            print_event(TargetFinished(method=method, index=index, total=len(targets), result=part.results[0]))
            report = reports[method]
            starts = report.settings.get("start_strings", {}) | part.settings.get("start_strings", {})
            report.settings, report.peak_memory_mb = part.settings, part.peak_memory_mb
            if method == "gcg":
                report.settings["start_strings"] = starts
            report.results.extend(part.results)
        paths = write_report(list(reports.values()), args.output, meta | {"targets_done": index + 1})
    print(Path(paths["markdown"]).read_text())


if __name__ == "__main__":
    main()
