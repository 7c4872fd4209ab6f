"""Tests of faults inside a run: non-finite steps, a target that does not fit the model, memory per step."""

from __future__ import annotations

import gc

import pytest
import torch

import sdlm.optimize
from conftest import build_tiny_model, build_tiny_tokenizer
from sdlm import STGSDiffModel
from sdlm.config import Config, ConfigError, EvalConfig, ObjectiveConfig, OptimizerConfig, PromptConfig, STGSConfig
from sdlm.objectives import LossOutput
from sdlm.optimize import StepEvent, optimize


def tiny_diff_model(tie: bool = True) -> STGSDiffModel:
    tokenizer = build_tiny_tokenizer()
    return STGSDiffModel(build_tiny_model("llama", len(tokenizer), tie=tie), tokenizer)


@pytest.fixture(scope="module")
def tiny_dm():
    return tiny_diff_model()


def short_config(**optimizer) -> Config:
    return Config(
        prompt=PromptConfig(length=4, samples=2),
        objective=ObjectiveConfig(target_ids=[5, 6, 7]),
        optimizer=OptimizerConfig(**{"steps": 30, "max_non_finite": 4, **optimizer}),
        eval=EvalConfig(every=2, stop_on_success=False),
    )


def step_events(events) -> list[StepEvent]:
    return [event for event in events if isinstance(event, StepEvent)]


# -- non-finite loss, gradient or update -------------------------------------------------


# 1e300 does not fit in float32, so torch.optim raises. Adam's first step at 1e38 moves the
# logits to about 1e38, and the next one overflows them to infinity.
@pytest.mark.parametrize("name, lr", [("adam", 1e300), ("adam", 1e38), ("sgd", 1e300)], ids=["adam-1e300", "adam-1e38", "sgd-1e300"])
def test_too_high_lr_stops_naming_lr(tiny_dm, name, lr):
    events: list = []
    result = optimize(short_config(name=name, lr=lr), model=tiny_dm, on_event=events.append)
    assert result.reason == "non_finite"
    assert "non-finite update" in result.message
    assert "optimizer.lr" in result.message
    assert [event.skipped for event in step_events(events)][-4:] == [True] * 4
    # Every update was undone, so the prompt logits are still finite and the best prompt is kept.
    assert torch.isfinite(result.string.logits).all()
    assert result.best is not None


def test_too_low_temperature_stops_naming_temperature(tiny_dm):
    config = short_config()
    config.stgs = STGSConfig(temperature=1e-39)
    result = optimize(config, model=tiny_dm)
    assert result.reason == "non_finite"
    assert result.steps == 4
    assert "stgs.temperature" in result.message
    assert "too low" in result.message
    assert result.best is not None
    assert result.summary()["message"] == result.message


def test_float16_overflow_stops_naming_dtype():
    model = tiny_diff_model(tie=False)
    model.model.half()
    with torch.no_grad():
        # Output weights this large overflow float16 (max 65504) in the logits.
        model.model.lm_head.weight.mul_(1e5)
    result = optimize(short_config(), model=model)
    assert result.reason == "non_finite"
    assert "float16" in result.message
    assert "model.dtype" in result.message


def test_single_non_finite_step_is_skipped(tiny_dm, monkeypatch):
    real_loss = sdlm.optimize.TargetObjective.loss
    calls = []

    def loss_with_one_nan(self, prompt_y):
        calls.append(1)
        scored = real_loss(self, prompt_y)
        if len(calls) == 2:
            return LossOutput(per_sample=scored.per_sample * float("nan"), solved=scored.solved, accuracy=scored.accuracy)
        return scored

    monkeypatch.setattr(sdlm.optimize.TargetObjective, "loss", loss_with_one_nan)
    logits_after: list[torch.Tensor] = []
    events: list = []

    def record(event) -> None:
        events.append(event)
        if isinstance(event, StepEvent):
            logits_after.append(string_logits[0].detach().clone())

    string_logits: list[torch.Tensor] = []
    real_build_prompt = sdlm.optimize.build_prompt

    def build_prompt(config, model, generator=None):
        string = real_build_prompt(config, model, generator)
        string_logits.append(string.logits)
        return string

    monkeypatch.setattr(sdlm.optimize, "build_prompt", build_prompt)
    result = optimize(short_config(steps=5), model=tiny_dm, on_event=record)

    assert result.reason == "max_steps"
    assert result.steps == 5
    assert [event.skipped for event in step_events(events)] == [False, True, False, False, False]
    assert torch.equal(logits_after[0], logits_after[1])
    assert not torch.equal(logits_after[1], logits_after[2])


def test_max_non_finite_is_configurable(tiny_dm):
    result = optimize(short_config(lr=1e300, max_non_finite=1), model=tiny_dm)
    assert result.reason == "non_finite"
    assert result.steps == 1


@pytest.mark.parametrize("value", [0, -1, 2.5, "many"])
def test_max_non_finite_rejects_bad_values(value):
    with pytest.raises(ConfigError, match="optimizer.max_non_finite"):
        OptimizerConfig(max_non_finite=value)


@pytest.mark.parametrize("value", [-1, 1.5, "often"])
def test_checkpoint_every_rejects_bad_values(value):
    with pytest.raises(ConfigError, match="eval.checkpoint_every"):
        EvalConfig(checkpoint_every=value)


# -- targets and prompts that do not fit the model ---------------------------------------

# The tiny Llama model has a context of 128 positions.


@pytest.mark.parametrize(
    "prompt, objective, message",
    [
        (
            {"length": 130},
            {"target_ids": [5, 6]},
            "prompt.length: a 130-token prompt plus 0 tokens of prompt.prefix and prompt.suffix leave no room "
            "for the target in the model's context of 128 tokens",
        ),
        (
            {"length": 10},
            {"target_ids": [5] * 125},
            "objective.target_ids: 125 tokens plus a 10-token prompt and 0 tokens of prefix and suffix exceed "
            "the model's context of 128 tokens (shorten objective.target_ids to at most 118 tokens",
        ),
        (
            {"length": 10},
            {"target": "hello world, " * 40},
            "objective.target: ",
        ),
        (
            {"length": 4},
            {"target_ids": [5, 100_000]},
            "objective.target_ids[1]: token id 100000 is outside the model's vocabulary of",
        ),
        (
            {"length": 4},
            {"target_ids": [5, 0, 6]},
            "objective.target_ids[1]: token id 0 ('<|endoftext|>') ends generation, so the model stops before "
            "the rest of the target (remove it, or keep it only as the last token)",
        ),
    ],
    ids=["prompt-too-long", "target-ids-too-long", "target-text-too-long", "target-id-outside-vocabulary",
         "end-of-sequence-inside-target"],
)
def test_target_or_prompt_exceeding_model_rejected(tiny_dm, prompt, objective, message):
    config = Config(prompt=PromptConfig(**prompt), objective=ObjectiveConfig(**objective))
    with pytest.raises(ConfigError) as raised:
        optimize(config, model=tiny_dm)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


# -- memory per step ---------------------------------------------------------------------


def live_tensor_bytes() -> tuple[int, int]:
    """Count the tensors the garbage collector can see, and their bytes."""
    gc.collect()
    tensors = [obj for obj in gc.get_objects() if type(obj) in (torch.Tensor, torch.nn.Parameter)]
    return len(tensors), sum(t.element_size() * t.nelement() for t in tensors)


def test_memory_per_step_is_flat(tiny_dm):
    config = Config(
        prompt=PromptConfig(length=6, samples=4),
        objective=ObjectiveConfig(target_ids=[5, 6, 7, 8, 9, 10, 11, 12]),
        optimizer=OptimizerConfig(steps=60),
        eval=EvalConfig(every=5, stop_on_success=False),
    )
    measured: dict[int, tuple[int, int]] = {}

    def measure(event) -> None:
        if isinstance(event, StepEvent) and event.step in (10, 60):
            measured[event.step] = live_tensor_bytes()

    result = optimize(config, model=tiny_dm, on_event=measure)
    count_10, bytes_10 = measured[10]
    count_60, bytes_60 = measured[60]
    assert count_60 <= count_10 * 1.03
    assert bytes_60 <= bytes_10 * 1.03
    assert all(type(loss) is float for loss in result.loss_history)


# NOTE: this project's machines have no GPU, so this test has only ever been skipped.
@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory per step is measured on CUDA")
def test_cuda_peak_memory_per_step_is_flat():
    tokenizer = build_tiny_tokenizer()
    model = STGSDiffModel(build_tiny_model("llama", len(tokenizer)).to("cuda"), tokenizer)
    config = Config(
        prompt=PromptConfig(length=6, samples=4),
        objective=ObjectiveConfig(target_ids=[5, 6, 7, 8, 9, 10, 11, 12]),
        optimizer=OptimizerConfig(steps=60),
        eval=EvalConfig(every=5, stop_on_success=False),
    )
    peaks: dict[int, int] = {}

    def measure(event) -> None:
        if isinstance(event, StepEvent) and event.step in (9, 59):
            torch.cuda.reset_peak_memory_stats()
        if isinstance(event, StepEvent) and event.step in (10, 60):
            peaks[event.step] = torch.cuda.max_memory_allocated()

    optimize(config, model=model, on_event=measure)
    assert peaks[60] <= peaks[10] * 1.03


def test_gradient_reset_each_step(tiny_dm, monkeypatch):
    """At each optimizer step, .grad equals the gradient of this step's backward pass alone."""
    this_backward: list[torch.Tensor] = []
    compared: list[bool] = []
    real_build_prompt, real_build_optimizer = sdlm.optimize.build_prompt, sdlm.optimize.build_optimizer

    def build_prompt(config, model, generator=None):
        string = real_build_prompt(config, model, generator)
        string.logits.register_hook(lambda grad: this_backward.append(grad.detach().clone()))
        return string

    def build_optimizer(name, params, lr):
        optimizer = real_build_optimizer(name, params, lr)

        def compare(optimizer, args, kwargs) -> None:
            compared.append(torch.equal(params[0].grad, this_backward[-1]))

        optimizer.register_step_pre_hook(compare)
        return optimizer

    monkeypatch.setattr(sdlm.optimize, "build_prompt", build_prompt)
    monkeypatch.setattr(sdlm.optimize, "build_optimizer", build_optimizer)
    optimize(short_config(steps=6), model=tiny_dm)
    assert len(compared) == 6
    assert all(compared)


def test_huge_prompt_length_rejected_before_allocation(tiny_dm):
    # 10**9 positions of (1, L, V) float32 logits would need terabytes.
    config = Config(prompt=PromptConfig(length=10**9), objective=ObjectiveConfig(target_ids=[5]))
    with pytest.raises(ConfigError, match="prompt.length: a 1000000000-token prompt"):
        optimize(config, model=tiny_dm)
