"""torch.compile of the gradient passes: routing, fallback, the bench warm-up, and one real compile."""

import logging

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from sdlm import STGSDiffModel
from sdlm.bench import BenchTarget, WarmingUp, run_bench
from sdlm.config import Config, ConfigError, ObjectiveConfig, config_from_dict
from sdlm.objectives import TargetObjective


class CountingCompile:
    """Stands in for torch.compile: returns the model wrapped in a call counter, or a failing one."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, model):
        def compiled(**kwargs):
            self.calls += 1
            if self.fail:
                raise RuntimeError("no C++ compiler\n\nSet TORCHDYNAMO_VERBOSE=1 for the internal stack trace")
            return model(**kwargs)

        return compiled


@pytest.fixture()
def tok():
    return build_tiny_tokenizer()


def _scores(dm, prompt_ids, target_ids):
    objective = TargetObjective(dm, target_ids)
    one_hot = torch.nn.functional.one_hot(torch.tensor([prompt_ids]), dm.vocab_size).float().requires_grad_(True)
    loss = objective.loss(one_hot).per_sample.sum()
    loss.backward()
    return loss.detach(), one_hot.grad


def test_only_gradient_passes_are_compiled(monkeypatch, tok):
    spy = CountingCompile()
    monkeypatch.setattr(torch, "compile", spy)
    dm = STGSDiffModel(build_tiny_model("llama", len(tok)), tok, compile=True)
    assert dm.compiled
    prompt, target = tok.encode("The quick"), tok.encode(" brown fox")
    _scores(dm, prompt, target)
    assert spy.calls == 1
    one_hot = torch.nn.functional.one_hot(torch.tensor([prompt]), dm.vocab_size).float().requires_grad_(True)
    dm.generate(one_hot=one_hot, max_new_tokens=2)  # a gradient, but through a KV cache
    TargetObjective(dm, target, prefix="Say:").loss(one_hot)  # after a cached prefix
    dm(input_ids=torch.tensor([prompt]))  # gradients on, but no input needs one
    with torch.no_grad():
        dm(one_hot=one_hot)
    assert spy.calls == 1


def test_failed_compile_warns_once_and_runs_eagerly(monkeypatch, tok, caplog):
    monkeypatch.setattr(torch, "compile", CountingCompile(fail=True))
    model = build_tiny_model("llama", len(tok))
    dm = STGSDiffModel(model, tok, compile=True)
    prompt, target = tok.encode("The quick"), tok.encode(" brown fox")
    with caplog.at_level(logging.WARNING, logger="sdlm"):
        loss, grad = _scores(dm, prompt, target)
        _scores(dm, prompt, target)
    assert caplog.text.count("torch.compile failed (RuntimeError: no C++ compiler); running the model eagerly") == 1
    assert "TORCHDYNAMO_VERBOSE" not in caplog.text
    assert not dm.compiled
    expected_loss, expected_grad = _scores(STGSDiffModel(model, tok), prompt, target)
    assert torch.equal(loss, expected_loss)
    assert torch.equal(grad, expected_grad)


def test_state_dict_without_compiled_copy(tok):
    model = build_tiny_model("llama", len(tok))
    assert STGSDiffModel(model, tok, compile=True).state_dict().keys() == STGSDiffModel(model, tok).state_dict().keys()


def test_model_compile_key():
    assert Config(objective=ObjectiveConfig(target="x")).model.compile is None
    assert config_from_dict({"objective": {"target": "x"}, "model": {"compile": True}}).model.compile is True
    with pytest.raises(ConfigError, match="model.compile: expected true or false or null"):
        config_from_dict({"objective": {"target": "x"}, "model": {"compile": "fast"}})


@pytest.mark.parametrize(("setting", "default", "expected"), [(None, True, True), (None, False, False), (False, True, False), (True, False, True)])
def test_load_diff_model_compile_default(monkeypatch, tok, setting, default, expected):
    import sdlm.models
    from sdlm.optimize import load_diff_model

    monkeypatch.setattr(sdlm.models, "load_model", lambda spec, **kwargs: (build_tiny_model("llama", len(tok)), tok))
    config = config_from_dict({"objective": {"target": "x"}, "model": {"compile": setting}})
    assert load_diff_model(config, compile_default=default).compiled is expected


def test_bench_warms_up_once_per_shape_before_timing(monkeypatch, tok):
    spy = CountingCompile()
    monkeypatch.setattr(torch, "compile", spy)
    dm = STGSDiffModel(build_tiny_model("llama", len(tok)), tok, compile=True)
    config = config_from_dict({"objective": {"target": "x"}, "prompt": {"length": 3, "samples": 2}, "eval": {"every": 100}})
    # Target lengths 3, 3 and 5: two shapes.
    targets = [BenchTarget(name, None, target_ids=ids) for name, ids in [("a", [40, 41, 42]), ("b", [50, 51, 52]), ("c", [60, 61, 62, 63, 64])]]
    events = []
    report = run_bench(config, targets, max_steps=2, model=dm, on_event=events.append)
    assert isinstance(events[0], WarmingUp)
    # Two one-step warm-up runs (the two target lengths), each with a step and the gradient pass
    # of a polish round (batch 1, where the steps have batch 2), then up to two steps per target.
    assert spy.calls == 2 * 2 + sum(r.steps for r in report.results)
    spy.calls = 0
    report = run_bench(config, targets, max_steps=2, model=dm, warm=False)
    assert spy.calls == sum(r.steps for r in report.results)


@pytest.mark.slow
def test_real_compile_matches_eager(tok):
    model = build_tiny_model("gpt2", len(tok))
    prompt, target = tok.encode("The quick"), tok.encode(" brown fox")
    eager_loss, eager_grad = _scores(STGSDiffModel(model, tok), prompt, target)
    dm = STGSDiffModel(model, tok, compile=True)
    loss, grad = _scores(dm, prompt, target)
    assert dm.compiled
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(grad, eager_grad, atol=1e-6, rtol=1e-4)


def test_plain_bench_renderer_announces_the_warm_up():
    import io

    from sdlm.bench_render import WARM_UP_LINE, PlainBenchRenderer, QuietBenchRenderer

    stream = io.StringIO()
    PlainBenchRenderer(stream).handle(WarmingUp(method="sdlm"))
    assert stream.getvalue() == WARM_UP_LINE + "\n"
    quiet = io.StringIO()
    QuietBenchRenderer(quiet).handle(WarmingUp(method="sdlm"))
    assert quiet.getvalue() == ""
