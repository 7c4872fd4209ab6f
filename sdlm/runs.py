"""The run directory: resolved config, metrics.jsonl, best prompt, learned string, summary.

Layout of a run directory:
    config.yaml              the resolved config the run used
    metrics.jsonl            one JSON object per logged step, appended line by line
    best_prompt.json         the best discrete prompt so far: text, ids, output, metrics
    prompt.safetensors(.json) the learned STGSDiffString (`STGSDiffString.load` reads it)
    summary.json             written once the run ends
    checkpoint.json          the latest checkpoint (see sdlm.checkpoint), with its tensors in
    checkpoint-<step>.safetensors

Every file except metrics.jsonl is written to a temporary file and renamed into place, so a
kill at any moment leaves the previous complete version.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


RUN_FILES = (
    "config.yaml", "metrics.jsonl", "best_prompt.json", "prompt.safetensors", "prompt.safetensors.json", "summary.json",
    "checkpoint.json",
)


class RunDirectoryError(ValueError):
    """The run directory cannot be made or written. key: the config key to change."""

    def __init__(self, message: str, key: str = "output_dir") -> None:
        super().__init__(message)
        self.key = key


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class RunDirectory:
    """Files of one run inside `path`; create it with `RunDirectory.create`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._metrics = None

    @classmethod
    def create(cls, output_dir: str | Path, name: str, *, force: bool = False, unique: bool = False) -> "RunDirectory":
        """Make `output_dir/name`.

        An existing directory is an error unless `force` (reuse it, replacing its files) or
        `unique` (append -2, -3, ... to the name until it is new).
        """
        output_dir = Path(output_dir)
        if output_dir.exists() and not output_dir.is_dir():
            raise RunDirectoryError(f"output_dir {str(output_dir)!r} is a file, not a directory; set output_dir to a folder")
        path = output_dir / name
        if path.exists():
            if unique:
                n = 2
                while (output_dir / f"{name}-{n}").exists():
                    n += 1
                path = output_dir / f"{name}-{n}"
            elif not force:
                raise RunDirectoryError(
                    f"run directory {str(path)!r} already exists; pass --force to reuse it or choose another run_name",
                    key="run_name",
                )
            elif not path.is_dir():
                raise RunDirectoryError(f"run directory {str(path)!r} is a file; remove it or choose another run_name", key="run_name")
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise RunDirectoryError(f"cannot write to run directory {str(path)!r}: {err.strerror}; choose a writable output_dir") from None
        run = cls(path)
        if force:
            # Files of the earlier run would read as this run's results, so they go first.
            for name in RUN_FILES:
                (path / name).unlink(missing_ok=True)
            for old in path.glob("checkpoint-*.safetensors"):
                old.unlink()
        return run

    def write_config(self, text: str) -> None:
        _atomic_write_text(self.path / "config.yaml", text)

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one JSON line and flush, so a kill loses at most the line being written."""
        if self._metrics is None:
            self._metrics = open(self.path / "metrics.jsonl", "a", buffering=1)
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def truncate_metrics(self, last_step: int) -> None:
        """Keep only the metrics rows up to `last_step`, so a resumed run does not repeat steps.

        A row cut short by a kill is dropped too.
        """
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
                kept.append(line + "\n")
        _atomic_write_text(path, "".join(kept))

    def write_best(self, best: dict[str, Any]) -> None:
        _atomic_write_text(self.path / "best_prompt.json", json.dumps(best, indent=2, ensure_ascii=False) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")

    def save_string(self, string) -> Path:
        path = self.path / "prompt.safetensors"
        string.save(path)
        return path

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def default_run_name(config_path: str | Path | None) -> str:
    """`<config stem>-<YYYYmmdd-HHMMSS>`, or `run-<timestamp>` without a config file."""
    stem = Path(config_path).stem if config_path else "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
