"""Rendering of optimization events for the CLI: a rich live view, plain log lines or JSON lines.

`optimize` emits RunStarted, StepEvent, EvalEvent and finally OptimizeResult. A renderer is a
context manager whose `handle(event)` is passed to `optimize` as `on_event`:

- `LiveRenderer`: a rich Live display on a terminal (progress bar, current and best prompt),
  then a summary table.
- `PlainRenderer`: one line per record, for logs and pipes. Step lines are rate-limited and no
  line is wrapped, cut or coloured.
- `JsonRenderer`: one JSON object per event, for programs.
- `QuietRenderer`: nothing.

Text from the model (prompts, outputs) is always shown quoted by `quote`, so leading spaces,
line breaks and control characters are visible and cannot garble a terminal.
"""

from __future__ import annotations

import json
import math
import time
import unicodedata
from dataclasses import asdict
from typing import IO, Any, Callable

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from sdlm.objectives import CheckResult
from sdlm.optimize import EvalEvent, Event, OptimizeResult, RunStarted, StepEvent

# Seconds between two step lines in plain and JSON output. The first and the last step of a
# run are always written, and every new best prompt is written at once.
STEP_LINE_INTERVAL = 2.0

# Unicode categories escaped by `quote`: control characters and line/paragraph separators.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})


# -- pure helpers ------------------------------------------------------------------------


def _plural(count: int, noun: str) -> str:
    """Return "1 sample" or "4 samples"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# Characters of the target that the header line shows.
MAX_TARGET_CHARS = 200


def describe_objective(start: RunStarted) -> str:
    """Describe the run's objective: the target and its length, then any other terms."""
    others = [name for name in start.terms if name != "target"]
    parts = []
    if start.target_ids:
        text = start.target_text
        if len(text) > MAX_TARGET_CHARS:
            # A long target would fill the terminal; the run directory keeps the whole text.
            text = text[:MAX_TARGET_CHARS] + "..."
        parts.append(f"target {quote(text)} ({len(start.target_ids)} tokens)")
    if others:
        parts.append("terms " + ", ".join(others))
    return ", ".join(parts) or "no objective terms"


def quote(text: str) -> str:
    """Quote text as a JSON string, also escaping DEL, C1 controls and Unicode line separators.

    The result is one line with no control characters. Other non-ASCII text stays readable.
    """
    quoted = json.dumps(text, ensure_ascii=False)
    return "".join(
        f"\\u{ord(char):04x}" if unicodedata.category(char) in _ESCAPED_CATEGORIES else char
        for char in quoted
    )


def format_duration(seconds: float) -> str:
    """Format seconds as M:SS or H:MM:SS, or "?" when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def step_rate(event: StepEvent) -> tuple[float, float]:
    """Return (steps per second, estimated seconds left) from the run's average so far."""
    if event.elapsed <= 0:
        return float("nan"), float("nan")
    rate = event.step / event.elapsed
    return rate, (event.steps - event.step) / rate


def json_safe(value: Any) -> Any:
    """Replace NaN and infinities by None, so strict JSON parsers accept the output."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def event_to_json(event: Event) -> dict[str, Any]:
    """Convert one event to plain data, with its kind under "event" ("start", "step", "eval", "end")."""
    if isinstance(event, OptimizeResult):
        data = event.summary()
    else:
        data = asdict(event)
    return json_safe({"event": event.kind, **data})


def outcome(result: OptimizeResult) -> str:
    """Describe in one phrase how the run ended."""
    if result.success:
        return "objective met"
    if result.reason == "interrupted":
        return "interrupted before the objective was met"
    if result.reason == "non_finite":
        return "stopped: the loss or gradient stayed non-finite"
    return "objective not met"


def _success_word(check: CheckResult) -> str:
    """Return the log's success word: "yes", "no", or "ids only" when the ids pass but the text does not."""
    if check.success and not check.text_success:
        return "ids only"
    return "yes" if check.success else "no"


def round_trip(check: CheckResult) -> str:
    """Describe whether the prompt survives decode -> re-encode, and whether its text works."""
    if check.text_ids_same:
        return "ok (the text re-encodes to the same ids)"
    if check.text_success:
        return "changed: the text re-encodes to other ids, and the pasted text meets the objective too"
    ids = " (the token ids do)" if check.success else ""
    return f"changed: the text re-encodes to other ids, and the pasted text does not meet the objective{ids}"


def summary_rows(result: OptimizeResult) -> list[tuple[str, str]]:
    """Build the (label, value) rows that describe the result in the table and the plain summary."""
    best = result.best
    rows = [
        ("result", outcome(result)),
        ("steps", f"{result.steps} (best prompt found at step {result.best_step})"),
        ("time", f"{result.seconds:.1f} s"),
        ("best prompt", quote(best.prompt_text)),
        ("prompt ids", json.dumps(best.prompt_ids)),
        ("greedy output", quote(best.output_text)),
        ("token accuracy", f"{best.token_accuracy:.3f}"),
        ("LCS ratio", f"{best.lcs_ratio:.3f}"),
        ("text round trip", round_trip(best)),
    ]
    if result.run_dir:
        rows.append(("run directory", result.run_dir))
    return rows


class RateLimiter:
    """Allow an action at most once per `interval` seconds of `clock`, unless forced."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._last: float | None = None

    def allow(self, force: bool = False) -> bool:
        now = self.clock()
        if force or self._last is None or now - self._last >= self.interval:
            self._last = now
            return True
        return False


# -- renderers ---------------------------------------------------------------------------


class Renderer:
    """Base renderer: ignores every event. Use it as a context manager around `optimize`."""

    def __enter__(self) -> "Renderer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def loading(self, spec: str, device: str) -> None:
        """Announce that the model is being loaded, which can take tens of seconds."""

    def handle(self, event: Event) -> None:
        """Render one event from `optimize`."""

    def close(self) -> None:
        """Stop any live display."""


QuietRenderer = Renderer


class _SteppedRenderer(Renderer):
    """Shared rate limiting of step records for the plain and JSON renderers."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self._limiter = RateLimiter(interval, clock)
        self._pending: StepEvent | None = None
        self._restarts_seen: int | None = None

    def handle(self, event: Event) -> None:
        if isinstance(event, StepEvent):
            # The first and last steps, and the step of each restart, are always written.
            restarted = self._restarts_seen is not None and event.restarts > self._restarts_seen
            last = event.step in (1, event.steps) or restarted
            self._restarts_seen = event.restarts
            if self._limiter.allow(force=last):
                self._pending = None
                self.write_step(event)
            else:
                self._pending = event
            return
        if isinstance(event, OptimizeResult) and self._pending is not None:
            # Write the last step of a run that stopped early, so the log ends on it.
            self.write_step(self._pending)
            self._pending = None
        self.write_other(event)

    def write_step(self, event: StepEvent) -> None:
        raise NotImplementedError

    def write_other(self, event: Event) -> None:
        raise NotImplementedError


class JsonRenderer(_SteppedRenderer):
    """One JSON object per line on `stream`: start, steps (rate-limited), every eval, end."""

    def __init__(
        self, stream: IO[str], interval: float = STEP_LINE_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(interval, clock)
        self.stream = stream

    def _write(self, event: Event) -> None:
        self.stream.write(json.dumps(event_to_json(event), ensure_ascii=False) + "\n")
        self.stream.flush()

    write_step = _write
    write_other = _write


class PlainRenderer(_SteppedRenderer):
    """Plain log lines on `stream`: the setup, steps (rate-limited), each new best, a summary.

    Lines are never wrapped or shortened, whatever the terminal width.
    """

    def __init__(
        self, stream: IO[str], interval: float = STEP_LINE_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(interval, clock)
        self.stream = stream

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def loading(self, spec: str, device: str) -> None:
        self._line(f"loading model {spec} (device {device})")

    def write_step(self, event: StepEvent) -> None:
        rate, remaining = step_rate(event)
        accuracy = "" if event.accuracy is None else f"  accuracy {event.accuracy:.2f}"
        skipped = "  (update skipped: non-finite loss or gradient)" if event.skipped else ""
        search = ""
        if event.restarts:
            search += f"  restarts {event.restarts}"
        if event.polish_matched is not None:
            search += f"  polish matches {event.polish_matched} leading target tokens"
        self._line(
            f"step {event.step}/{event.steps}  loss {event.loss:.4f}  best sample {event.best_sample_loss:.4f}"
            f"{accuracy}  temperature {event.temperature:.3g}  {rate:.2f} step/s  ETA {format_duration(remaining)}"
            f"{search}  prompt {quote(event.prompt_text)}{skipped}"
        )

    def write_other(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self._line(f"run directory: {event.run_dir}")
            self._line(
                f"model {event.model} on {event.device}; {describe_objective(event)}; "
                f"prompt of {event.prompt_length} tokens; {event.steps} steps of {_plural(event.samples, 'sample')}"
            )
        elif isinstance(event, EvalEvent) and event.improved:
            check = event.check
            self._line(
                f"new best at step {event.step}: success {_success_word(check)}  "
                f"token accuracy {check.token_accuracy:.3f}  LCS ratio {check.lcs_ratio:.3f}  "
                f"prompt {quote(check.prompt_text)}  output {quote(check.output_text)}"
            )
        elif isinstance(event, OptimizeResult):
            for label, value in summary_rows(event):
                self._line(f"{label}: {value}")


class LiveRenderer(Renderer):
    """A rich Live display on `console` while the run goes, then a summary table.

    stop_requested: polled at each refresh. While it returns True, the view shows that the run
    is stopping.
    """

    def __init__(self, console: Console, stop_requested: Callable[[], bool] = lambda: False) -> None:
        self.console = console
        self._status = "starting"
        self._start: RunStarted | None = None
        self._step: StepEvent | None = None
        self._best: EvalEvent | None = None
        self._stop_requested = stop_requested
        self._live = Live(console=console, get_renderable=self._view, refresh_per_second=4, transient=True)
        self._live.start()

    def loading(self, spec: str, device: str) -> None:
        self._status = f"loading model {spec} (device {device}) ..."
        self._live.refresh()

    def handle(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self._start = event
        elif isinstance(event, StepEvent):
            self._step = event
        elif isinstance(event, EvalEvent) and event.improved:
            self._best = event
        elif isinstance(event, OptimizeResult):
            self.close()
            self.console.print(self._summary_table(event))

    def close(self) -> None:
        if self._live.is_started:
            self._live.stop()

    def _view(self) -> RenderableType:
        start, step = self._start, self._step
        if start is None:
            return Text(self._status)
        parts: list[RenderableType] = [
            Text(f"model {start.model} on {start.device}  {describe_objective(start)}  run {start.run_dir}")
        ]

        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=start.steps, completed=step.step if step else 0, width=30),
            f"{step.step if step else 0}/{start.steps}",
            *(self._step_fields(step) if step else ["waiting for the first step"]),
        )
        parts.append(bar)

        prompts = Table.grid(padding=(0, 1))
        prompts.add_column(style="bold", no_wrap=True)
        prompts.add_column(overflow="fold")
        if step is not None:
            prompts.add_row("prompt", Text(quote(step.prompt_text)))
        if self._best is not None:
            best = self._best.best
            prompts.add_row(
                "best",
                Text(f"{quote(best.prompt_text)}  token accuracy {best.token_accuracy:.2f}  (step {self._best.step})"),
            )
        parts.append(prompts)
        if self._stop_requested():
            parts.append(Text("stopping after this step (interrupt again to abort)", style="yellow"))
        return Group(*parts)

    @staticmethod
    def _step_fields(step: StepEvent) -> list[str]:
        rate, remaining = step_rate(step)
        fields = [
            f"loss {step.loss:.4f}",
            f"τ {step.temperature:.3g}",
            f"{rate:.2f} step/s",
            f"ETA {format_duration(remaining)}",
        ]
        if step.restarts:
            fields.append(f"restarts {step.restarts}")
        return fields

    @staticmethod
    def _summary_table(result: OptimizeResult) -> Table:
        style = "green" if result.success else "yellow"
        table = Table(title="sdlm optimize", show_header=False, title_style=style)
        table.add_column(style="bold", no_wrap=True)
        table.add_column(overflow="fold")
        for label, value in summary_rows(result):
            table.add_row(label, Text(value, style=style if label == "result" else ""))
        return table
