"""Tests of checkpoints and resume: a resumed run continues the trajectory of an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from sdlm import STGSDiffModel
from sdlm.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint
from sdlm.config import Config, EvalConfig, ObjectiveConfig, OptimizerConfig, PromptConfig, SearchConfig, STGSConfig
from sdlm.optimize import EvalEvent, optimize
from sdlm.polish import Polisher
from sdlm.runs import RunDirectory


@pytest.fixture(scope="module")
def tiny_dm():
    tokenizer = build_tiny_tokenizer()
    return STGSDiffModel(build_tiny_model("llama", len(tokenizer)), tokenizer)


def trajectory_config(steps: int, search: dict | None = None, **stgs) -> Config:
    return Config(
        prompt=PromptConfig(length=4, samples=2),
        stgs=STGSConfig(**stgs),
        objective=ObjectiveConfig(target_ids=[5, 6, 7, 8, 9, 10]),
        optimizer=OptimizerConfig(steps=steps, lr=0.3),
        eval=EvalConfig(every=3, stop_on_success=False, checkpoint_every=4),
        search=SearchConfig(**(search or {})),
        seed=7,
    )


def stop_after(step: int):
    """A should_stop that requests a stop at the end of `step`, counting from this run's first step."""
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) >= step

    return should_stop


def evals(events) -> list[tuple[int, list[int], bool]]:
    return [(e.step, e.check.prompt_ids, e.improved) for e in events if isinstance(e, EvalEvent)]


@pytest.mark.parametrize(
    "stgs, search",
    [
        ({}, None),
        ({"learnable_temperature": "scalar"}, None),
        ({"learnable_temperature": "per_position"}, None),
        ({}, {"polish_every": 2, "polish_width": 8, "polish_after": 0, "restart_patience": 2}),
        ({}, {"polish_every": 2, "polish_width": 8, "polish_after": 0, "polish_from": "best", "restart_patience": 2}),
        ({}, {"restart_patience": 1, "restart_bias": 3.0}),
    ],
    ids=["fixed-temperature", "scalar-temperature", "per-position-temperature", "polish-and-restarts",
         "polish-best-and-restarts", "biased-restarts"],
)
def test_resume_matches_uninterrupted_run(tiny_dm, tmp_path, stgs, search):
    steps, stop_at = 12, 5
    config = trajectory_config(steps, search, **stgs)
    straight_events: list = []
    straight = optimize(config, model=tiny_dm, run=RunDirectory.create(tmp_path, "straight"), on_event=straight_events.append)

    first_events: list = []
    run = RunDirectory.create(tmp_path, "resumed")
    first = optimize(config, model=tiny_dm, run=run, on_event=first_events.append, should_stop=stop_after(stop_at))
    assert first.reason == "interrupted"
    assert first.steps == stop_at
    checkpoint = load_checkpoint(run.path)
    assert checkpoint.state.step == stop_at
    if search and search.get("polish_every"):
        assert checkpoint.state.polish_track is not None

    resumed_events: list = []
    resumed = optimize(config, model=tiny_dm, run=RunDirectory(run.path), resume=checkpoint, on_event=resumed_events.append)

    assert resumed.steps == steps
    assert resumed.loss_history == straight.loss_history
    assert torch.equal(resumed.string.logits, straight.string.logits)
    for name, value in straight.string.state_dict().items():
        assert torch.equal(resumed.string.state_dict()[name], value), name
    assert resumed.best == straight.best
    assert resumed.best_step == straight.best_step
    assert evals(first_events) + evals(resumed_events) == evals(straight_events)

    # metrics.jsonl contains each step once, after the appends of both runs.
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    straight_rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [row["loss"] for row in rows] == [row["loss"] for row in straight_rows]
    if search and search.get("restart_bias"):
        # A biased restart falls after the stop, and the bias changes the trajectory.
        restarts_at_stop = [e.restarts for e in first_events if getattr(e, "kind", None) == "step"][-1]
        restarts_at_end = [e.restarts for e in resumed_events if getattr(e, "kind", None) == "step"][-1]
        assert restarts_at_end > restarts_at_stop
        unbiased = optimize(trajectory_config(steps, {**search, "restart_bias": 0.0}, **stgs), model=tiny_dm)
        assert not torch.equal(unbiased.string.logits, straight.string.logits)


def test_resume_polishes_from_saved_track(tiny_dm, tmp_path, monkeypatch):
    """The first polish round after a resume swaps from the saved current prompt, which may
    differ from the incumbent."""
    config = trajectory_config(8, {"polish_every": 2, "polish_width": 8, "polish_after": 0})
    run = RunDirectory.create(tmp_path, "resumed")
    optimize(config, model=tiny_dm, run=run, should_stop=stop_after(4))
    checkpoint = load_checkpoint(run.path)
    track_ids = [40, 41, 42, 43]
    checkpoint.state.polish_track = [track_ids, 0, 99.0]
    assert checkpoint.state.incumbent[0] != track_ids
    polished_from = []
    polish = Polisher.polish

    def record_polish(self):
        polished_from.append(list((self.track or self.incumbent).ids))
        return polish(self)

    monkeypatch.setattr(Polisher, "polish", record_polish)
    optimize(config, model=tiny_dm, run=RunDirectory(run.path), resume=checkpoint)

    assert polished_from[0] == track_ids


def test_resume_from_periodic_checkpoint_after_kill(tiny_dm, tmp_path):
    """A run killed after step 10 resumes from its step-8 checkpoint and drops the later rows."""
    config = trajectory_config(14)
    straight = optimize(config, model=tiny_dm)

    run = RunDirectory.create(tmp_path, "killed")

    class Killed(Exception):
        pass

    def kill_after_step_10(event) -> None:
        if getattr(event, "kind", None) == "step" and event.step == 10:
            raise Killed

    with pytest.raises(Killed):
        optimize(config, model=tiny_dm, run=run, on_event=kill_after_step_10)
    run.close()
    # A kill can also cut the last metrics line short.
    with open(run.path / "metrics.jsonl", "a") as file:
        file.write('{"step": 11, "lo')

    checkpoint = load_checkpoint(run.path)
    assert checkpoint.state.step == 8
    assert sorted(p.name for p in run.path.glob("checkpoint-*.safetensors")) == ["checkpoint-00000008.safetensors"]
    resumed_run = RunDirectory(run.path)
    resumed_run.truncate_metrics(checkpoint.state.step)
    resumed = optimize(config, model=tiny_dm, run=resumed_run, resume=checkpoint)

    assert resumed.loss_history == straight.loss_history
    assert torch.equal(resumed.string.logits, straight.string.logits)
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 15))


def test_checkpoint_json_names_complete_tensor_file(tiny_dm, tmp_path):
    run = RunDirectory.create(tmp_path, "run")
    optimize(trajectory_config(9), model=tiny_dm, run=run)
    data = json.loads((run.path / CHECKPOINT_FILE).read_text())
    assert data["tensors"] == "checkpoint-00000009.safetensors"
    assert (run.path / data["tensors"]).is_file()
    assert data["state"]["step"] == 9
    assert not list(run.path.glob(".*.tmp"))


def test_resume_rejects_checkpoint_of_other_prompt(tiny_dm, tmp_path):
    run = RunDirectory.create(tmp_path, "run")
    optimize(trajectory_config(2), model=tiny_dm, run=run)
    other = trajectory_config(4)
    other.prompt.length = 6
    with pytest.raises(CheckpointError, match="does not fit the prompt"):
        optimize(other, model=tiny_dm, resume=load_checkpoint(run.path))


def test_load_checkpoint_missing(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)


def test_load_checkpoint_truncated_tensors(tiny_dm, tmp_path):
    run = RunDirectory.create(tmp_path, "run")
    optimize(trajectory_config(2), model=tiny_dm, run=run)
    tensors = next(run.path.glob("checkpoint-*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="failed to read checkpoint tensors"):
        load_checkpoint(run.path)


def test_resume_of_met_run_stops_at_once(tiny_dm, tmp_path):
    from sdlm.objectives import greedy_generate

    prompt_ids = tiny_dm.tokenizer.encode("hello world")
    config = Config(
        prompt=PromptConfig(init_text="hello world", init_scale=20.0, samples=1),
        objective=ObjectiveConfig(target_ids=greedy_generate(tiny_dm, prompt_ids, 3)),
        optimizer=OptimizerConfig(steps=20),
        eval=EvalConfig(every=1),
    )
    run = RunDirectory.create(tmp_path, "run")
    first = optimize(config, model=tiny_dm, run=run)
    assert first.success
    resumed = optimize(config, model=tiny_dm, resume=load_checkpoint(run.path))
    assert resumed.success
    assert resumed.steps == first.steps
    assert resumed.loss_history == first.loss_history
