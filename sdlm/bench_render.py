"""Progress display for `sdlm bench`: a rich progress bar on a terminal, plain lines otherwise.

Both write to stderr, one line per finished target, so stdout keeps only the results table.
"""

from __future__ import annotations

import sys
from typing import IO

from sdlm.bench import BenchEvent, TargetFinished, TargetStarted, WarmingUp
from sdlm.render import quote

WARM_UP_LINE = "compiling the model's gradient passes (torch.compile, about a minute the first time)"


def target_line(event: TargetFinished) -> str:
    """Return one line for a finished target, e.g. "[sdlm] 2/10 random_1: solved in 24 steps, 6.8 s, ..."."""
    r = event.result
    step_count = f"{r.steps} step" if r.steps == 1 else f"{r.steps} steps"
    outcome = f"solved in {step_count}, {r.solved_at:.1f} s" if r.success else f"not solved in {step_count}, {r.seconds:.1f} s"
    text = "" if r.text_success == r.success else f" (after decode -> re-encode: {'solved' if r.text_success else 'not solved'})"
    return (
        f"[{r.method}] {event.index + 1}/{event.total} {r.target_id}: {outcome}{text}, "
        f"token accuracy {r.token_accuracy:.2f}, prompt {quote(r.prompt_text)}"
    )


class PlainBenchRenderer:
    """One line per finished target on `stream`."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr

    def __enter__(self) -> "PlainBenchRenderer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def loading(self, spec: str) -> None:
        self._line(f"loading model {spec}")

    def handle(self, event: BenchEvent) -> None:
        if isinstance(event, TargetFinished):
            self._line(target_line(event))
        elif isinstance(event, WarmingUp):
            self._line(WARM_UP_LINE)

    def close(self) -> None:
        pass

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


class QuietBenchRenderer(PlainBenchRenderer):
    """Writes nothing."""

    def _line(self, text: str) -> None:
        pass


class LiveBenchRenderer(PlainBenchRenderer):
    """A rich progress bar over the targets, with a line printed above it per finished target."""

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True,
        )
        self.task = None
        self.progress.start()

    def loading(self, spec: str) -> None:
        self.console.print(f"loading model {spec}")

    def handle(self, event: BenchEvent) -> None:
        if isinstance(event, TargetStarted):
            description = f"{event.method}: {event.target_id}"
            if self.task is None:
                self.task = self.progress.add_task(description, total=event.total)
            self.progress.update(self.task, description=description)
        elif isinstance(event, TargetFinished):
            self.progress.console.print(target_line(event), markup=False, highlight=False)
            self.progress.update(self.task, completed=event.index + 1)
        elif isinstance(event, WarmingUp):
            self.progress.console.print(WARM_UP_LINE, markup=False, highlight=False)

    def close(self) -> None:
        self.progress.stop()
