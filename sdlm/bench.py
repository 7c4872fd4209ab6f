"""Benchmark runner: optimize one prompt per target with the same config and budget, and summarise.

`run_bench(config, targets)` is the one-call entry point. Like `optimize`, it never prints:
progress goes to `on_event` as the dataclasses below. `write_report` writes the results as
JSON, a markdown table and, when matplotlib is installed, a PNG of the fraction of targets
solved against wall-clock seconds.

Targets come from `load_targets(path)`, which reads two formats. A JSON file of inversion
samples is an object with a "samples" list whose items have "target_tokens" and optionally
"id", "target_text" and "prompt_tokens". A JSONL file has one target per line: a JSON string,
or an object with "target_text" / "target" / "text" and optionally "id" and "target_tokens" /
"target_ids".

Example:
    >>> targets = load_targets("lmi_smollm2_instruct_pl10_tl10.json")   # doctest: +SKIP
    >>> report = run_bench(Config(), targets, max_seconds=60)
    >>> write_report([report], "bench-out")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from sdlm.config import Config

logger = logging.getLogger("sdlm")

# Steps used when the caller sets only a time budget; the budget then ends each run.
UNLIMITED_STEPS = 1_000_000


class TargetFileError(ValueError):
    """A targets file that is missing, unreadable or not in a supported format."""


# -- targets -----------------------------------------------------------------------------


@dataclass
class BenchTarget:
    """One target: `target_ids` is exact when the file gives token ids, else None (the text is
    encoded by the model's tokenizer). `prompt_length`: the length of the known prompt, if any."""

    id: str
    target_text: str | None
    target_ids: list[int] | None = None
    prompt_length: int | None = None


def _int_list(value: Any, where: str) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TargetFileError(f"{where}: expected a non-empty list of token ids (integers), got {value!r}")
    return list(value)


def _target_from_object(item: Any, where: str, default_id: str) -> BenchTarget:
    if isinstance(item, str):
        if not item:
            raise TargetFileError(f"{where}: the target text is empty")
        return BenchTarget(id=default_id, target_text=item)
    if not isinstance(item, dict):
        raise TargetFileError(f"{where}: expected a JSON string or object, got {type(item).__name__}")
    ids = _int_list(item.get("target_tokens", item.get("target_ids")), where)
    text = next((item[k] for k in ("target_text", "target", "text") if isinstance(item.get(k), str)), None)
    if ids is None and not text:
        raise TargetFileError(
            f"{where}: no target found; give target_tokens (token ids) or target_text (a non-empty string)"
        )
    prompt = item.get("prompt_tokens")
    prompt_length = len(prompt) if isinstance(prompt, list) and prompt else None
    return BenchTarget(id=str(item.get("id", default_id)), target_text=text, target_ids=ids, prompt_length=prompt_length)


def load_targets(path: str | os.PathLike) -> list[BenchTarget]:
    """Read benchmark targets from a JSON samples file or a JSONL file (see the module docstring).

    Raises TargetFileError, naming the file and the line or sample, for a missing file, invalid
    JSON, a sample without a target, or a file with no targets.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TargetFileError(f"targets file {str(path)!r} not found; check the path") from None
    except IsADirectoryError:
        raise TargetFileError(f"targets file {str(path)!r} is a directory; give a .json or .jsonl file") from None
    except UnicodeDecodeError as error:
        raise TargetFileError(f"targets file {str(path)!r} is not UTF-8 text: {error.reason}") from None

    stripped = text.lstrip()
    targets: list[BenchTarget] = []
    if stripped.startswith("{") and path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise TargetFileError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from None
        samples = data.get("samples")
        if not isinstance(samples, list):
            raise TargetFileError(
                f"{path}: a JSON targets file needs a \"samples\" list (or use JSONL, one target per line)"
            )
        for i, item in enumerate(samples):
            targets.append(_target_from_object(item, f"{path}: sample {i}", f"sample_{i}"))
    elif stripped.startswith("["):
        raise TargetFileError(f"{path}: a JSON list is not supported; write one target per line (JSONL)")
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise TargetFileError(f"{path}: line {number} is not valid JSON: {error.msg}") from None
            targets.append(_target_from_object(item, f"{path}: line {number}", f"line_{number}"))
    if not targets:
        raise TargetFileError(f"{path}: no targets found")
    seen: set[str] = set()
    for target in targets:
        if target.id in seen:
            raise TargetFileError(f"{path}: target id {target.id!r} appears twice; ids must be unique")
        seen.add(target.id)
    return targets


# -- results -----------------------------------------------------------------------------


@dataclass
class TargetResult:
    """The outcome of one method on one target.

    success: greedy generation from the prompt ids reproduces the target (as text too, under
    eval.require_text); text_success: the same after decode -> re-encode of the prompt.
    seconds: wall clock until success, or until the run ended without one. solved_at: seconds
    to success, None when unsolved.
    """

    method: str
    target_id: str
    target_text: str
    success: bool
    text_success: bool
    steps: int
    seconds: float
    solved_at: float | None
    prompt_text: str
    prompt_ids: list[int]
    token_accuracy: float
    lcs_ratio: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodReport:
    """All targets of one method, the settings it ran with, and its peak memory."""

    method: str
    settings: dict[str, Any]
    results: list[TargetResult]
    peak_memory_mb: float | None = None

    def summary(self) -> dict[str, Any]:
        return summarize(self.results, self.peak_memory_mb)


@dataclass
class TargetStarted:
    kind = "target_start"
    method: str
    index: int
    total: int
    target_id: str


@dataclass
class TargetFinished:
    kind = "target_end"
    method: str
    index: int
    total: int
    result: TargetResult


@dataclass
class WarmingUp:
    """torch.compile compiles the gradient passes before the first timed target."""

    kind = "warm_up"
    method: str


BenchEvent = TargetStarted | TargetFinished | WarmingUp


def summarize(results: Sequence[TargetResult], peak_memory_mb: float | None = None) -> dict[str, Any]:
    """Compute success counts, median steps and seconds to success, and seconds per step."""
    solved = [r for r in results if r.success]
    total_steps = sum(r.steps for r in results)
    total_seconds = sum(r.seconds for r in results)
    return {
        "targets": len(results),
        "solved": len(solved),
        "solved_text": sum(r.text_success for r in results),
        "success_rate": len(solved) / len(results) if results else 0.0,
        "median_steps_to_success": statistics.median(r.steps for r in solved) if solved else None,
        "median_seconds_to_success": statistics.median(r.solved_at for r in solved) if solved else None,
        "seconds_per_step": total_seconds / total_steps if total_steps else None,
        "total_seconds": total_seconds,
        "peak_memory_mb": peak_memory_mb,
    }


def peak_memory_mb(device: str = "cpu") -> float:
    """Return the peak memory of this process in MiB: CUDA allocations on a GPU, else the peak resident set size."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in bytes on macOS and in KiB on Linux.
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


# -- the runner --------------------------------------------------------------------------

# The benchmark sets each run's target, so a base config needs none. This text fills the field.
_TARGET_PLACEHOLDER = "(set per target by the benchmark)"


def load_base_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Build the config every target runs with from a YAML file (its target is ignored) or the defaults.

    Raises ConfigError like `load_config` for an invalid file or override.
    """
    from sdlm.config import config_from_yaml, load_config

    target_override = f"objective.target={_TARGET_PLACEHOLDER}"
    if path is not None:
        return load_config(path, [target_override, *overrides])
    return config_from_yaml("{}", "<defaults>", overrides=[target_override, *overrides])


def target_config(base: Config, target: BenchTarget, *, max_steps: int | None, seed: int | None = None) -> Config:
    """Return the base config aimed at one target: its exact ids (or text), prompt length and step limit."""
    objective = dataclasses.replace(base.objective, target=target.target_text, target_ids=target.target_ids)
    prompt = base.prompt
    if target.prompt_length is not None and prompt.init_text is None:
        prompt = dataclasses.replace(prompt, length=target.prompt_length)
    optimizer = base.optimizer
    if max_steps is not None:
        optimizer = dataclasses.replace(optimizer, steps=max_steps)
    eval_config = dataclasses.replace(base.eval, stop_on_success=True)
    return dataclasses.replace(
        base, objective=objective, prompt=prompt, optimizer=optimizer, eval=eval_config,
        seed=base.seed if seed is None else seed,
    )


def run_bench(
    config: Config,
    targets: Sequence[BenchTarget],
    *,
    max_steps: int | None = None,
    max_seconds: float | None = None,
    model=None,
    on_event: Callable[[BenchEvent], None] | None = None,
    method: str = "sdlm",
    warm: bool = True,
) -> MethodReport:
    """Optimize a prompt for each target with `config`; stop each at success or the budget.

    max_steps: steps per target (default config.optimizer.steps, or unlimited when only
    max_seconds is set). max_seconds: wall-clock budget per target, checked after each step.
    model: a ready STGSDiffModel, else config.model is loaded once for all targets (compiled
    unless model.compile is false), as are the models of model.ensemble. warm: with a compiled
    model, run `warm_up` before the first target, so that no target's time includes compiling.
    """
    from sdlm.optimize import load_diff_model, optimize

    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds!r}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps!r}")
    if max_steps is None and max_seconds is not None:
        max_steps = UNLIMITED_STEPS
    emit = on_event or (lambda event: None)
    model = model if model is not None else load_diff_model(config, compile_default=True)
    # Ensemble models load once here; optimize would load them again for every target.
    ensemble = [load_diff_model(config, spec, compile_default=True) for spec in config.model.ensemble]
    if warm and any(m.compiled for m in [model, *ensemble]):
        emit(WarmingUp(method=method))
        warm_up(config, targets, model, ensemble)

    results = []
    for index, target in enumerate(targets):
        emit(TargetStarted(method=method, index=index, total=len(targets), target_id=target.id))
        run_config = target_config(config, target, max_steps=max_steps)
        deadline = None if max_seconds is None else time.perf_counter() + max_seconds
        should_stop = None if deadline is None else (lambda: time.perf_counter() >= deadline)
        outcome = optimize(run_config, model=model, should_stop=should_stop, ensemble=ensemble)
        best = outcome.best
        solved_at = outcome.seconds if outcome.success else None
        result = TargetResult(
            method=method, target_id=target.id, target_text=_target_text(model, run_config),
            success=outcome.success, text_success=best.text_success, steps=outcome.steps, seconds=outcome.seconds,
            solved_at=solved_at, prompt_text=best.prompt_text, prompt_ids=best.prompt_ids,
            token_accuracy=best.token_accuracy, lcs_ratio=best.lcs_ratio,
            extra={"best_step": outcome.best_step, "reason": outcome.reason},
        )
        results.append(result)
        emit(TargetFinished(method=method, index=index, total=len(targets), result=result))

    settings = {
        "config": dataclasses.asdict(config), "max_steps": max_steps, "max_seconds": max_seconds,
        "compiled": model.compiled,  # False also after a failed compile fell back to eager
    }
    return MethodReport(method=method, settings=settings, results=results, peak_memory_mb=peak_memory_mb(str(model.device)))


def warm_up(config: Config, targets: Sequence[BenchTarget], model, ensemble: Sequence = ()) -> None:
    """Run one step for each prompt and target length among the targets, so that torch.compile
    compiles before the timed runs. The step includes a polish round of one swap: the polish's
    gradient pass has a batch of one, which differs from the step's when prompt.samples > 1."""
    from sdlm.optimize import optimize

    search = config.search
    if search.polish_every:
        search = dataclasses.replace(search, polish_after=0, polish_every=1, polish_width=1)
    warm_config = dataclasses.replace(config, search=search)
    shapes = set()
    for target in targets:
        run_config = target_config(warm_config, target, max_steps=1)
        ids = target.target_ids or model.tokenizer.encode(target.target_text, add_special_tokens=False)
        shape = (run_config.prompt.init_text or run_config.prompt.length, len(ids))
        if shape not in shapes:
            shapes.add(shape)
            optimize(run_config, model=model, ensemble=ensemble)


def _target_text(model, config: Config) -> str:
    if config.objective.target_ids:
        return model.tokenizer.decode(list(config.objective.target_ids), clean_up_tokenization_spaces=False)
    return config.objective.target or ""


# -- reports -----------------------------------------------------------------------------

_COLUMNS = ("target", "success", "text", "steps", "seconds", "token acc", "LCS", "prompt")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_report(reports: Sequence[MethodReport]) -> str:
    """Render a summary table (one row per method) and a per-target table per method as markdown."""
    lines = ["| method | solved | solved (text) | median steps | median s to success | s/step | peak MiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for report in reports:
        s = report.summary()
        lines.append(
            f"| {report.method} | {s['solved']}/{s['targets']} | {s['solved_text']}/{s['targets']} "
            f"| {_fmt(s['median_steps_to_success'])} | {_fmt(s['median_seconds_to_success'])} "
            f"| {_fmt(s['seconds_per_step'], 3)} | {_fmt(s['peak_memory_mb'], 0)} |"
        )
    ratio = speed_ratio(reports)
    if ratio is not None:
        lines += ["", f"Median seconds to success, {reports[1].method} / {reports[0].method}: {ratio:.1f}x"]
    for report in reports:
        lines += ["", f"### {report.method}", "", "| " + " | ".join(_COLUMNS) + " |", "|" + " --- |" * len(_COLUMNS)]
        for r in report.results:
            lines.append(
                f"| {_cell(r.target_id)} | {'yes' if r.success else 'no'} | {'yes' if r.text_success else 'no'} "
                f"| {r.steps} | {r.seconds:.1f} | {r.token_accuracy:.2f} | {r.lcs_ratio:.2f} | `{_cell(repr(r.prompt_text))}` |"
            )
    return "\n".join(lines) + "\n"


def speed_ratio(reports: Sequence[MethodReport]) -> float | None:
    """Return the median seconds to success of the second method over the first, or None unless both solved some."""
    if len(reports) < 2:
        return None
    first, second = (r.summary()["median_seconds_to_success"] for r in reports[:2])
    if not first or second is None:
        return None
    return second / first


def solved_curve(results: Sequence[TargetResult]) -> tuple[list[float], list[float]]:
    """Return the step curve (xs, ys) of the fraction of targets solved against wall-clock seconds."""
    times = sorted(r.solved_at for r in results if r.success and r.solved_at is not None)
    xs, ys = [0.0], [0.0]
    for i, t in enumerate(times, start=1):
        xs += [t, t]
        ys += [ys[-1], i / len(results)]
    end = max([r.seconds for r in results] + [xs[-1]])
    xs.append(end)
    ys.append(ys[-1])
    return xs, ys


def write_plot(reports: Sequence[MethodReport], path: str | os.PathLike) -> bool:
    """Plot the fraction of targets solved against seconds, one curve per method.

    Returns False, with a logged warning, when matplotlib is not installed (the `bench` extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed, so no plot was written; install it with pip install matplotlib")
        return False
    figure, axes = plt.subplots(figsize=(6, 4))
    longest = 0.0
    for report in reports:
        xs, ys = solved_curve(report.results)
        longest = max(longest, xs[-1])
        axes.plot(xs, ys, label=report.method)
    axes.set_xlim(0, max(longest, 1.0))
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("wall-clock seconds per target")
    axes.set_ylabel("fraction of targets solved")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(reports: Sequence[MethodReport], output_dir: str | os.PathLike, meta: dict | None = None) -> dict[str, Path]:
    """Write results.json, results.md and solved_vs_seconds.png (if matplotlib is present)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": meta or {},
        "methods": [
            {"method": r.method, "settings": r.settings, "summary": r.summary(), "results": [asdict(x) for x in r.results]}
            for r in reports
        ],
        "ratio_median_seconds": speed_ratio(reports),
    }
    paths = {"json": output_dir / "results.json", "markdown": output_dir / "results.md"}
    paths["json"].write_text(json.dumps(data, indent=2, ensure_ascii=False, default=_json_default) + "\n")
    paths["markdown"].write_text(markdown_report(reports))
    png = output_dir / "solved_vs_seconds.png"
    if write_plot(reports, png):
        paths["plot"] = png
    return paths


def load_reports(path: str | os.PathLike) -> tuple[list[MethodReport], dict[str, Any]]:
    """Read the method reports and the meta block back from a results.json that write_report wrote."""
    data = json.loads(Path(path).read_text())
    reports = [
        MethodReport(
            method=m["method"], settings=m["settings"], results=[TargetResult(**r) for r in m["results"]],
            peak_memory_mb=m["summary"].get("peak_memory_mb"),
        )
        for m in data["methods"]
    ]
    return reports, data.get("meta", {})


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def machine_info() -> dict[str, Any]:
    """Return the cores, torch threads, CPU model, torch version and date, for the records."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
