import json

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from sdlm import STGSDiffModel
from sdlm.config import Config, EvalConfig, ObjectiveConfig, OptimizerConfig, PromptConfig
from sdlm.objectives import greedy_generate
from sdlm.optimize import OptimizeResult, RunStarted, StepEvent, optimize, scheduled_temperature
from sdlm.runs import RunDirectory


@pytest.fixture()
def tiny_dm():
    tok = build_tiny_tokenizer()
    return STGSDiffModel(build_tiny_model("llama", len(tok)), tok)


def test_reachable_target_succeeds_from_its_prompt(tiny_dm, tmp_path):
    prompt_ids = tiny_dm.tokenizer.encode("hello world")
    target = greedy_generate(tiny_dm, prompt_ids, 4)
    config = Config(
        prompt=PromptConfig(init_text="hello world", init_scale=20.0, samples=2),
        objective=ObjectiveConfig(target_ids=target),
        optimizer=OptimizerConfig(steps=5, lr=1e-3),
        eval=EvalConfig(every=1),
    )
    events = []
    run = RunDirectory.create(tmp_path, "run")
    result = optimize(config, model=tiny_dm, run=run, on_event=events.append)
    assert result.success
    assert result.reason == "success"
    assert result.best.output_ids[: len(target)] == target
    assert isinstance(events[0], RunStarted)
    assert isinstance(events[-1], OptimizeResult)
    best = json.loads((tmp_path / "run" / "best_prompt.json").read_text())
    assert best["success"] is True
    assert greedy_generate(tiny_dm, best["prompt_ids"], len(target)) == target
    assert (tmp_path / "run" / "prompt.safetensors").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["success"] is True
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, result.steps + 1))


def test_unmet_target_runs_all_steps(tiny_dm):
    config = Config(
        prompt=PromptConfig(length=3, samples=2),
        objective=ObjectiveConfig(target_ids=[5, 6, 7, 8, 9, 10, 11, 12]),
        optimizer=OptimizerConfig(steps=4),
        eval=EvalConfig(every=2),
    )
    steps = []
    before = {k: v.clone() for k, v in tiny_dm.model.state_dict().items()}
    result = optimize(config, model=tiny_dm, on_event=lambda e: steps.append(e) if isinstance(e, StepEvent) else None)
    assert not result.success
    assert result.reason == "max_steps"
    assert result.steps == 4
    assert len(result.loss_history) == 4
    assert all(type(x) is float for x in result.loss_history)
    assert [e.step for e in steps] == [1, 2, 3, 4]
    for key, value in tiny_dm.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_generation_mode_and_should_stop(tiny_dm):
    config = Config(
        prompt=PromptConfig(length=3, samples=2, prefix="The", suffix=" end"),
        objective=ObjectiveConfig(target_ids=[5, 6, 7], mode="generation"),
        optimizer=OptimizerConfig(steps=50),
    )
    calls = []
    result = optimize(config, model=tiny_dm, should_stop=lambda: len(calls.append(1) or calls) >= 3)
    assert result.reason == "interrupted"
    assert result.steps == 3


def test_same_seed_same_trajectory(tiny_dm):
    config = Config(
        prompt=PromptConfig(length=3, samples=2),
        objective=ObjectiveConfig(target_ids=[5, 6, 7]),
        optimizer=OptimizerConfig(steps=5),
        seed=3,
    )
    a = optimize(config, model=tiny_dm)
    b = optimize(config, model=tiny_dm)
    assert a.loss_history == b.loss_history
    assert torch.equal(a.string.logits, b.string.logits)


@pytest.mark.parametrize("schedule", ["constant", "linear", "exponential", "cosine"])
def test_temperature_schedules(schedule):
    values = [scheduled_temperature(schedule, 2.0, 0.1, step, 11) for step in range(1, 12)]
    assert values[0] == pytest.approx(2.0)
    if schedule != "constant":
        assert values[-1] == pytest.approx(0.1)
        assert all(a >= b for a, b in zip(values, values[1:]))
    assert min(values) > 0


def test_forced_run_directory_drops_earlier_results(tmp_path):
    first = RunDirectory.create(tmp_path, "run")
    first.write_best({"success": True})
    first.write_summary({"success": True})
    first.append_metrics({"step": 1})
    first.close()
    with pytest.raises(ValueError, match="already exists"):
        RunDirectory.create(tmp_path, "run")
    RunDirectory.create(tmp_path, "run", force=True)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []
    unique = RunDirectory.create(tmp_path, "run", unique=True)
    assert unique.path.name == "run-2"


def test_per_position_temperature_matches_init_text(tiny_dm):
    from sdlm.config import STGSConfig
    from sdlm.optimize import build_prompt

    config = Config(
        prompt=PromptConfig(init_text="hello world, hello model"),
        stgs=STGSConfig(learnable_temperature="per_position"),
        objective=ObjectiveConfig(target_ids=[5]),
    )
    string = build_prompt(config, tiny_dm)
    assert string.length == len(tiny_dm.tokenizer.encode("hello world, hello model"))
    assert string.stgs.temperature_raw.shape == (string.length,)


@pytest.mark.parametrize("mode", ["scalar", "per_position"])
def test_learnable_temperature_run_skips_no_update(tiny_dm, mode):
    from sdlm.config import STGSConfig

    config = Config(
        prompt=PromptConfig(length=3, samples=2),
        stgs=STGSConfig(learnable_temperature=mode),
        objective=ObjectiveConfig(target_ids=[5, 6, 7, 8]),
        optimizer=OptimizerConfig(steps=5),
    )
    steps = []
    result = optimize(config, model=tiny_dm, on_event=lambda e: steps.append(e) if isinstance(e, StepEvent) else None)

    assert result.reason == "max_steps"
    assert [e.skipped for e in steps] == [False] * 5
    assert len({e.temperature for e in steps}) > 1  # the temperature learns


@pytest.mark.parametrize("require_text", [False, True])
def test_require_text_rejects_ids_only_success(tiny_dm, monkeypatch, require_text):
    """A prompt whose ids reproduce the target but whose pasted text does not stops the run
    only when eval.require_text is off."""
    import dataclasses

    from sdlm.objectives import TargetObjective

    check = TargetObjective.check
    monkeypatch.setattr(
        TargetObjective, "check", lambda self, ids: dataclasses.replace(check(self, ids), success=True, text_success=False)
    )
    config = Config(
        prompt=PromptConfig(length=3),
        objective=ObjectiveConfig(target_ids=[5, 6, 7]),
        optimizer=OptimizerConfig(steps=4),
        eval=EvalConfig(every=1, require_text=require_text),
    )
    result = optimize(config, model=tiny_dm)

    assert result.best.success
    assert result.success is not require_text
    assert result.steps == (4 if require_text else 1)
    assert result.reason == ("max_steps" if require_text else "success")


@pytest.mark.parametrize(
    "success, text_success, require_text, expected",
    [
        (True, True, True, True),
        (True, False, True, False),
        (True, False, False, True),
        (False, True, True, False),
        (False, True, False, False),
    ],
    ids=["both-pass", "ids-only-required", "ids-only-allowed", "text-only-required", "text-only-allowed"],
)
def test_check_meets_text_requirement(success, text_success, require_text, expected):
    from sdlm.objectives import CheckResult

    check = CheckResult(
        success=success, prompt_ids=[1], prompt_text="p", output_ids=[2], output_text="o", token_accuracy=1.0,
        lcs_ratio=1.0, text_ids_same=False, text_success=text_success,
    )

    assert check.meets(require_text) is expected


def _check_of(tokenizer, ids):
    from sdlm.objectives import CheckResult

    return CheckResult(
        success=False, prompt_ids=list(ids), prompt_text=tokenizer.decode(ids), output_ids=[], output_text="",
        token_accuracy=0.0, lcs_ratio=0.0, text_ids_same=False, text_success=True,
    )


def test_pasted_ids_same_length_only(tiny_dm):
    from sdlm.optimize import pasted_ids

    tok = tiny_dm.tokenizer
    h_en = [tok.convert_tokens_to_ids("h"), tok.convert_tokens_to_ids("en")]
    he_n = [tok.convert_tokens_to_ids("he"), tok.convert_tokens_to_ids("n")]
    allowed = torch.ones(tiny_dm.vocab_size, dtype=torch.bool)

    assert pasted_ids(_check_of(tok, h_en), tok, allowed) == he_n
    # Ids that are already the text's own tokens, and a text that encodes to fewer tokens.
    assert pasted_ids(_check_of(tok, he_n), tok, allowed) is None
    h_e = [tok.convert_tokens_to_ids("h"), tok.convert_tokens_to_ids("e")]
    assert tok.encode(tok.decode(h_e)) == [he_n[0]]
    assert pasted_ids(_check_of(tok, h_e), tok, allowed) is None
    # A token that the prompt may not use, in the (V,) and the (L, V) form of the mask.
    allowed[he_n[0]] = False
    assert pasted_ids(_check_of(tok, h_en), tok, allowed) is None
    per_position = torch.ones(2, tiny_dm.vocab_size, dtype=torch.bool)
    per_position[1, he_n[1]] = False
    assert pasted_ids(_check_of(tok, h_en), tok, per_position) is None


def _optimize_with_pasted_ids(tiny_dm, monkeypatch, pasted, outcome, steps):
    """Run a 3-token prompt whose checks pass as outcome(ids) -> (success, text_success) says,
    and whose text's own ids are always `pasted`."""
    import dataclasses

    import sdlm.optimize as optimize_module
    from sdlm.objectives import TargetObjective

    check = TargetObjective.check

    def patched_check(self, ids):
        success, text_success = outcome(list(ids))
        return dataclasses.replace(check(self, ids), success=success, text_success=text_success)

    monkeypatch.setattr(optimize_module, "pasted_ids", lambda check_result, tokenizer, allowed: pasted)
    monkeypatch.setattr(TargetObjective, "check", patched_check)
    config = Config(
        prompt=PromptConfig(length=3),
        objective=ObjectiveConfig(target_ids=[8, 9, 10]),
        optimizer=OptimizerConfig(steps=steps),
        eval=EvalConfig(every=1),
    )
    return optimize(config, model=tiny_dm)


def test_text_only_success_adopts_pasted_ids(tiny_dm, monkeypatch):
    """A prompt whose text works but whose ids do not leads to a check of the text's own ids,
    which end the run as a success that works both ways."""
    fixed = [5, 6, 7]
    result = _optimize_with_pasted_ids(tiny_dm, monkeypatch, fixed, lambda ids: (ids == fixed, True), steps=4)

    assert result.success
    assert result.steps == 1
    assert result.best.prompt_ids == fixed
    assert result.best.text_success


def test_failed_pasted_ids_keep_original_check(tiny_dm, monkeypatch):
    """When the text's own ids fail, the prompt that was checked stays the best prompt."""
    pasted = [5, 6, 7]
    result = _optimize_with_pasted_ids(tiny_dm, monkeypatch, pasted, lambda ids: (False, ids != pasted), steps=1)

    assert not result.success
    assert result.best.prompt_ids != pasted
    assert result.best.text_success
