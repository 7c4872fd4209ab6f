"""End-to-end runs of the objective starter configs on the embedded model (marked slow).

Each test runs a config from configs/ as shipped, or with fewer steps where the test checks
the run's plumbing rather than its success. Times are in each config's header comment.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdlm.config import load_config
from sdlm.objectives import greedy_generate
from sdlm.optimize import load_diff_model, optimize

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded():
    return load_diff_model(load_config(CONFIGS / "margin.yaml"))


def run(name: str, model, overrides=()):
    config = load_config(CONFIGS / name, overrides)
    return optimize(config, model=model)


@pytest.mark.parametrize("name", ["margin.yaml", "entropy.yaml"])
def test_target_configs_succeed(embedded, name):
    result = run(name, embedded)

    assert result.success
    assert result.best.terms["target"]
    assert result.best.metrics["prompt_perplexity"] > 1


def test_fluency_config_scores_prompt_loss(embedded):
    result = run("fluency.yaml", embedded, ["optimizer.steps=3"])

    assert "fluency.perplexity" in result.best.metrics
    assert result.best.terms.keys() == {"target", "fluency"}


def test_keywords_config_succeeds(embedded):
    result = run("keywords.yaml", embedded)

    assert result.success
    assert "France" in result.best.output_text
    assert "Germany" not in result.best.output_text


def test_task_config_reaches_full_training_accuracy(embedded):
    result = run("task_capitals.yaml", embedded)

    assert result.success
    report = result.summary()["report"]["task"]
    assert report["train_examples"] == 12
    assert report["heldout_examples"] == 4
    assert report["train_accuracy_before"] == pytest.approx(10 / 12)
    assert report["train_accuracy_after"] == 1.0
    assert report["heldout_accuracy_before"] is not None
    assert report["heldout_accuracy_after"] is not None


def test_chat_config_succeeds(embedded):
    result = run("chat.yaml", embedded)

    assert result.success
    assert result.best.output_text == "The capital of France is Paris."


def test_constraints_config_keeps_its_constraints(embedded):
    result = run("constraints.yaml", embedded)
    tokenizer = embedded.tokenizer
    ids = result.best.prompt_ids

    assert result.success
    assert ids[:2] == tokenizer.encode("Once upon", add_special_tokens=False)
    assert tokenizer.decode(ids[9:]).strip().isalpha()
    assert "ancient" not in result.best.prompt_text


def test_ensemble_config_succeeds_in_both_precisions(embedded):
    # The same weights in two precisions are two real models with one vocabulary. The prompt
    # must reproduce the target under both.
    config = load_config(CONFIGS / "ensemble.yaml")
    bfloat16 = load_diff_model(config, config.model.ensemble[0])
    result = optimize(config, model=embedded, ensemble=[bfloat16])
    target = embedded.tokenizer.encode(config.objective.target, add_special_tokens=False)

    assert bfloat16.dtype == torch.bfloat16
    assert result.success
    assert greedy_generate(embedded, result.best.prompt_ids, len(target)) == target
    assert greedy_generate(bfloat16, result.best.prompt_ids, len(target)) == target
