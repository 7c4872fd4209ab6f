"""Checkpoints of the optimization loop: everything needed to continue the same trajectory.

A checkpoint in a run directory is two files:

    checkpoint-<step>.safetensors   tensors: the learned string's state (prompt logits,
                                    temperature parameters, vocabulary mask), the optimizer's
                                    tensor state and the random number generator states
    checkpoint.json                 the rest as JSON: step, loss history, best prompt so far,
                                    the prompts already checked, optimizer settings, and the
                                    name of its tensor file

checkpoint.json is replaced last and atomically, so at any moment it names a complete tensor
file. Older tensor files are deleted after the switch. Nothing is read with pickle.

Example:
    >>> state = LoopState(step=40, seconds=12.5)                       # doctest: +SKIP
    >>> save_checkpoint(run_dir, state, string, optimizer, generator)
    >>> checkpoint = load_checkpoint(run_dir)
    >>> restore_checkpoint(checkpoint, string, optimizer, generator)   # same trajectory onwards
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CHECKPOINT_FILE = "checkpoint.json"
# Bump when the layout changes, so an old checkpoint is rejected with a clear message.
CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the run's config."""


@dataclass
class LoopState:
    """The loop's plain-data state at the end of a step.

    best: the best CheckResult so far as a dict, or None before the first check. best_loss:
    the loss that ranked it. checked: prompts (token ids) already checked with greedy
    generation. seconds: optimization time so far, across resumes.
    """

    step: int
    seconds: float = 0.0
    history: list[float] = field(default_factory=list)
    best: dict[str, Any] | None = None
    best_step: int = 0
    best_loss: float | None = None
    checked: list[list[int]] = field(default_factory=list)
    non_finite_in_a_row: int = 0
    # The discrete polish's incumbent and the prompt its next round swaps from, each as
    # [ids, matched, loss], or None. A checkpoint without a track resumes from the incumbent.
    incumbent: list[Any] | None = None
    polish_track: list[Any] | None = None
    # Restarts: the lowest loss since the last restart, the step it was reached, and the count.
    restart_low: float | None = None
    restart_step: int = 0
    restarts: int = 0
    # The sample a biased restart starts near, as [ids, accuracy, loss], or None.
    anchor: list[Any] | None = None


@dataclass
class Checkpoint:
    """A loaded checkpoint: the loop state, the tensors and the optimizer's plain settings."""

    state: LoopState
    tensors: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    path: Path


# -- optimizer state as tensors plus JSON ------------------------------------------------


def _split_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split optimizer.state_dict() into tensors ("optimizer.<param>.<name>") and plain data."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                values.setdefault(str(index), {})[name] = value
    plain = {"param_groups": state_dict["param_groups"], "values": values}
    return tensors, plain


def _join_optimizer_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            index, name = key.removeprefix("optimizer.").split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for index, entries in plain["values"].items():
        state.setdefault(int(index), {}).update(entries)
    # JSON turned tuples such as Adam's betas into lists.
    groups = [
        {name: tuple(value) if isinstance(value, list) and name != "params" else value for name, value in group.items()}
        for group in plain["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


# -- writing -------------------------------------------------------------------------------


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as file:
        json.dump(data, file, ensure_ascii=False)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: str | Path,
    state: LoopState,
    string: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> Path:
    """Write a checkpoint of `state` into run_dir and return the path of checkpoint.json."""
    run_dir = Path(run_dir)
    tensors = {f"string.{name}": value.detach().cpu().contiguous() for name, value in string.state_dict().items()}
    optimizer_tensors, optimizer_plain = _split_optimizer_state(optimizer)
    tensors.update(optimizer_tensors)
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()

    tensor_name = f"checkpoint-{state.step:08d}.safetensors"
    tensor_path = run_dir / tensor_name
    tmp = tensor_path.with_name(f".{tensor_name}.tmp")
    save_file(tensors, str(tmp))
    with open(tmp, "rb") as file:
        os.fsync(file.fileno())
    os.replace(tmp, tensor_path)

    data = {
        "format": CHECKPOINT_FORMAT,
        "tensors": tensor_name,
        "state": asdict(state),
        "optimizer": optimizer_plain,
    }
    json_path = run_dir / CHECKPOINT_FILE
    _write_json_atomic(json_path, data)

    # The new checkpoint.json no longer names the older tensor files.
    for old in run_dir.glob("checkpoint-*.safetensors"):
        if old.name != tensor_name:
            old.unlink(missing_ok=True)
    return json_path


# -- reading -------------------------------------------------------------------------------


def load_checkpoint(run_dir: str | Path) -> Checkpoint:
    """Read the checkpoint of a run directory. Raises CheckpointError naming the file and the fix."""
    run_dir = Path(run_dir)
    json_path = run_dir / CHECKPOINT_FILE
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{json_path} not found: the run directory has no checkpoint, because the run stopped before "
            "saving one (runs save one every eval.checkpoint_every steps and when they stop); start a new run"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"failed to read checkpoint {json_path} ({error}); start a new run") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise CheckpointError(
            f"checkpoint {json_path} has format {found!r}, but this sdlm reads format {CHECKPOINT_FORMAT}; "
            "start a new run"
        )
    tensor_path = run_dir / Path(str(data.get("tensors", ""))).name
    try:
        tensors = load_file(str(tensor_path))
    except (OSError, SafetensorError) as error:
        raise CheckpointError(
            f"failed to read checkpoint tensors {tensor_path} ({error}); start a new run"
        ) from None
    try:
        state = LoopState(**data["state"])
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {json_path} is incomplete ({error}); start a new run") from None
    return Checkpoint(state=state, tensors=tensors, optimizer=data["optimizer"], path=json_path)


def restore_checkpoint(
    checkpoint: Checkpoint,
    string: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> None:
    """Load the string, optimizer and generator states of `checkpoint` in place.

    Raises CheckpointError when the checkpoint's prompt does not fit `string`, which happens
    when the config's prompt or model changed since the checkpoint was written.
    """
    tensors = checkpoint.tensors
    string_state = {key.removeprefix("string."): value for key, value in tensors.items() if key.startswith("string.")}
    expected = string.state_dict()
    mismatched = sorted(
        name for name in expected.keys() | string_state.keys()
        if name not in expected or name not in string_state or expected[name].shape != string_state[name].shape
    )
    if mismatched:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} does not fit the prompt of this config "
            f"(different {', '.join(mismatched)}); resume with the run's own config.yaml and model"
        )
    string.load_state_dict(string_state)
    optimizer.load_state_dict(_join_optimizer_state(tensors, checkpoint.optimizer))
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
