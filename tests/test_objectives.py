"""Tests of the objective terms on tiny random models: losses, gradients and check semantics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny_model, build_tiny_tokenizer
from sdlm import STGSDiffModel, STGSDiffString
from sdlm.chat import chat_frame
from sdlm.config import Config, ConfigError, ObjectiveConfig, OptimizerConfig, PromptConfig, TaskConfig
from sdlm.constraints import position_mask
from sdlm.objectives import TargetObjective, greedy_generate, token_losses
from sdlm.objectives_composite import CompositeObjective, EnsembleObjective
from sdlm.objectives_keywords import KeywordsTerm, find_words, first_token_ids
from sdlm.objectives_prompt import EntropyTerm, FluencyTerm, masked_entropy, prompt_perplexity
from sdlm.objectives_task import Example, TaskTerm, load_examples, split_examples, split_template
from sdlm.optimize import RunStarted, build_objective, optimize
from sdlm.render import describe_objective
from sdlm.stgs_diff_string import banned_token_mask


@pytest.fixture(scope="module")
def dm():
    tok = build_tiny_tokenizer()
    return STGSDiffModel(build_tiny_model("llama", len(tok) + 5, tie=False), tok)


@pytest.fixture(scope="module")
def gpt2_dm():
    tok = build_tiny_tokenizer()
    return STGSDiffModel(build_tiny_model("gpt2", len(tok)), tok)


def sample_prompt(dm, text="hello world", samples=3):
    string = STGSDiffString(dm.tokenizer, init_text=text, vocab_size=dm.vocab_size)
    return string, string.sample(samples, generator=torch.Generator().manual_seed(0))


def assert_reaches_prompt(string, per_sample):
    assert per_sample.shape == (3,)
    assert torch.isfinite(per_sample).all()
    per_sample.mean().backward()
    assert string.logits.grad is not None
    assert torch.isfinite(string.logits.grad).all()
    assert string.logits.grad.abs().sum() > 0


# -- target: margin loss -----------------------------------------------------------------


def test_margin_loss_hand_values():
    logits = torch.tensor([[[3.0, 1.0, 0.0], [0.0, 2.5, 2.0], [1.0, 1.0, 0.0]]])  # (1, 3, 3)
    targets = torch.tensor([[0, 1, 1]])

    losses = token_losses(logits, targets, "margin", margin=1.0)

    # gaps: 3 - 1 = 2 (no loss), 2.5 - 2 = 0.5 (loss 0.5), 1 - 1 = 0 (loss 1)
    assert losses[0].tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_cross_entropy_loss_matches_torch():
    logits = torch.randn(2, 4, 7)
    targets = torch.randint(0, 7, (2, 4))

    losses = token_losses(logits, targets)

    assert losses.mean() == pytest.approx(float(F.cross_entropy(logits.view(8, 7), targets.view(8))))


def test_unknown_token_loss_rejected():
    with pytest.raises(ValueError, match="cross_entropy or margin"):
        token_losses(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), "hinge")


@pytest.mark.parametrize("mode", ["teacher_forcing", "generation"])
def test_target_margin_loss_reaches_prompt(dm, mode):
    string, draw = sample_prompt(dm)
    objective = TargetObjective(dm, [5, 6, 7], mode=mode, loss="margin", margin=2.0)

    out = objective.loss(draw.y)

    assert_reaches_prompt(string, out.per_sample)


def test_margin_loss_zero_when_target_leads(dm):
    ids = dm.tokenizer.encode("hello world")
    target = greedy_generate(dm, ids, 3)
    objective = TargetObjective(dm, target, loss="margin", margin=0.0)
    one_hot = F.one_hot(torch.tensor([ids]), dm.vocab_size).float()

    out = objective.loss(one_hot)

    assert out.per_sample.tolist() == [0.0]
    assert out.solved.tolist() == [True]


# -- fluency -----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "The"])
def test_fluency_loss_reaches_prompt(dm, prefix):
    string, draw = sample_prompt(dm)

    out = FluencyTerm(dm, prefix=prefix).loss(draw.y)

    assert_reaches_prompt(string, out.per_sample)


@pytest.mark.parametrize("prefix", ["", "The"])
def test_prompt_perplexity_matches_hf_loss(gpt2_dm, prefix):
    dm = gpt2_dm
    prefix_ids = dm.tokenizer.encode(prefix)
    prompt_ids = dm.tokenizer.encode(" quick brown fox")
    ids = torch.tensor([prefix_ids + prompt_ids])
    labels = ids.clone()
    labels[0, : len(prefix_ids)] = -100

    expected = math.exp(float(dm.model(input_ids=ids, labels=labels).loss))

    assert prompt_perplexity(dm, dm.encode(prefix), prompt_ids) == pytest.approx(expected, rel=1e-4)


def test_one_token_prompt_without_prefix_has_no_perplexity(dm):
    string, draw = sample_prompt(dm, text="hello")

    out = FluencyTerm(dm).loss(draw.y[:, :1])

    assert out.per_sample.tolist() == [0.0, 0.0, 0.0]
    assert prompt_perplexity(dm, dm.encode(""), draw.ids[0, :1].tolist()) is None


def test_fluency_check_thresholds(dm):
    ids = dm.tokenizer.encode("hello world, hello model")
    perplexity = prompt_perplexity(dm, dm.encode(""), ids)

    loose = FluencyTerm(dm, max_perplexity=perplexity * 1.01).check(ids)
    strict = FluencyTerm(dm, max_perplexity=perplexity * 0.99).check(ids)
    none = FluencyTerm(dm).check(ids)

    assert loose.success
    assert not strict.success
    assert none.success
    assert loose.metrics["perplexity"] == pytest.approx(perplexity)


# -- entropy -----------------------------------------------------------------------------


def test_masked_entropy_of_uniform_logits():
    mask = torch.tensor([True, True, False, True])

    entropy = masked_entropy(torch.zeros(1, 2, 4), mask)

    assert float(entropy[0]) == pytest.approx(math.log(3))


def test_masked_entropy_of_one_hot_logits_is_small():
    logits = torch.tensor([[[50.0, 0.0, 0.0]]])

    assert float(masked_entropy(logits, torch.tensor([True, True, True]))[0]) < 1e-6


def test_entropy_loss_reaches_logits(dm):
    string, draw = sample_prompt(dm)
    term = EntropyTerm(string)

    out = term.loss(draw.y)

    assert_reaches_prompt(string, out.per_sample)
    assert term.check(string.ids.tolist()).success
    assert "entropy" in term.check(string.ids.tolist()).metrics


# -- keywords ----------------------------------------------------------------------------


def test_find_words_case():
    assert find_words("The Quick fox", ["quick", "dog"], case_sensitive=False) == [True, False]
    assert find_words("The Quick fox", ["quick"], case_sensitive=True) == [False]


def test_first_token_ids_cover_spellings(dm):
    ids = first_token_ids(dm.tokenizer, "hello", case_sensitive=False)

    assert dm.tokenizer.encode("hello")[0] in ids
    assert dm.tokenizer.encode(" hello")[0] in ids
    assert len(ids) == len(set(ids))


def test_keywords_loss_reaches_prompt(dm):
    string, draw = sample_prompt(dm)
    term = KeywordsTerm(dm, require=["fox"], avoid=["dog"], max_new_tokens=4)

    out = term.loss(draw.y)

    assert_reaches_prompt(string, out.per_sample)
    assert out.solved.shape == (3,)


def test_keywords_check_semantics(dm):
    ids = dm.tokenizer.encode("hello world")
    output = dm.tokenizer.decode(greedy_generate(dm, ids, 6))
    present = output.strip()[:3]
    assert present, "the tiny model generated only whitespace"
    absent = "zzzqqq"

    assert KeywordsTerm(dm, require=[present], max_new_tokens=6).check(ids).success
    assert not KeywordsTerm(dm, require=[present, absent], max_new_tokens=6).check(ids).success
    assert not KeywordsTerm(dm, avoid=[present], max_new_tokens=6).check(ids).success
    result = KeywordsTerm(dm, require=[present], avoid=[absent], max_new_tokens=6).check(ids)
    assert result.success
    assert result.token_accuracy == 1.0
    assert result.metrics == {"required_found": 1.0, "avoided_found": 0.0}


def test_keywords_check_case_sensitivity(dm):
    ids = dm.tokenizer.encode("hello world")
    output = dm.tokenizer.decode(greedy_generate(dm, ids, 6))
    letters = [c for c in output if c.isalpha()]
    if not letters:
        pytest.skip("the tiny model generated no letters")
    swapped = letters[0].swapcase()

    assert KeywordsTerm(dm, require=[swapped], max_new_tokens=6, case_sensitive=False).check(ids).success
    sensitive = KeywordsTerm(dm, require=[swapped], max_new_tokens=6, case_sensitive=True).check(ids)
    assert sensitive.success == (swapped in output)


def test_keywords_need_a_word(dm):
    with pytest.raises(ValueError, match="at least one word"):
        KeywordsTerm(dm)


# -- task --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "before", "after"),
    [
        ("{prompt}\nInput: {input}\nOutput:", "", "\nInput: cat\nOutput:"),
        ("Q: {input} {prompt} A:", "Q: cat ", " A:"),
        ("{{x}} {input}{prompt}", "{x} cat", ""),
    ],
)
def test_split_template(template, before, after):
    assert split_template(template, "cat") == (before, after)


def test_split_examples_seeded():
    examples = [Example(str(i), str(i)) for i in range(8)]

    train, heldout = split_examples(examples, 0.25, seed=1)

    assert len(train) == 6
    assert len(heldout) == 2
    assert sorted(e.input for e in train + heldout) == [str(i) for i in range(8)]
    assert split_examples(examples, 0.25, seed=1) == (train, heldout)
    assert split_examples([examples[0]], 0.5, seed=0) == ([examples[0]], [])


def test_load_examples_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"input": "cat", "output": "CAT"}\n\n{"input": "dog", "output": "DOG"}\n')
    csv_file = tmp_path / "a.csv"
    csv_file.write_text('input,output\ncat,CAT\n"a, b",A B\n')

    assert load_examples(jsonl) == [Example("cat", "CAT"), Example("dog", "DOG")]
    assert load_examples(csv_file) == [Example("cat", "CAT"), Example("a, b", "A B")]


@pytest.mark.parametrize(
    ("name", "text", "line", "message"),
    [
        ("a.jsonl", '{"input": "x", "output": "y"}\n{"input": 1}\n', 2, "input and output"),
        ("a.jsonl", '{"input": "x", "output": "y"}\nnot json\n', 2, "invalid JSON"),
        ("a.csv", "in,out\nx,y\n", 1, "columns input and output"),
        ("a.csv", "input,output\nx,y\nz,\n", 3, "output is empty"),
    ],
)
def test_load_examples_bad_rows(tmp_path, name, text, line, message):
    path = tmp_path / name
    path.write_text(text)

    with pytest.raises(ConfigError, match=message) as raised:
        load_examples(path)

    assert raised.value.key == "task.path"
    assert raised.value.line == line


def test_load_examples_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="task.path: file not found"):
        load_examples(tmp_path / "none.jsonl")


def task_examples(dm, prompt="hello world", inputs=("cat", "dog", "fox", "12345")):
    """Build examples whose outputs are the tiny model's own greedy outputs with `prompt`."""
    term = TaskTerm(dm, [Example(i, "x") for i in inputs])
    outputs = term.outputs(dm.tokenizer.encode(prompt), term._encoded_train)
    return [Example(i, o) for i, o in zip(inputs, outputs) if o.strip()]


def test_task_loss_reaches_prompt(dm):
    string, draw = sample_prompt(dm)
    term = TaskTerm(dm, [Example("cat", "CAT"), Example("a longer input", "A LONGER"), Example("x", "X")], batch_size=3)

    out = term.loss(draw.y)

    assert_reaches_prompt(string, out.per_sample)


@pytest.mark.parametrize("fixture", ["dm", "gpt2_dm"])
def test_task_padded_batch_equals_one_by_one(request, fixture):
    dm = request.getfixturevalue(fixture)
    examples = [Example("cat", "CAT"), Example("a much longer input here", "A"), Example("x", "X Y Z")]
    _, draw = sample_prompt(dm)
    together = TaskTerm(dm, examples, batch_size=3, seed=0)

    batch_loss = together.loss(draw.y).per_sample
    single = []
    for example in examples:
        term = TaskTerm(dm, [example], batch_size=1)
        single.append(term.loss(draw.y).per_sample)

    assert torch.allclose(batch_loss, torch.stack(single).mean(0), atol=1e-4)


def test_task_check_and_report(dm):
    prompt_ids = dm.tokenizer.encode("hello world")
    examples = task_examples(dm)
    assert len(examples) >= 2
    term = TaskTerm(dm, examples[:-1], examples[-1:], output_prefix="")

    result = term.check(prompt_ids)
    report = term.report(prompt_ids, prompt_ids)

    assert result.success
    assert result.token_accuracy == 1.0
    assert report["train_accuracy_before"] == 1.0
    assert report["heldout_accuracy_after"] == 1.0
    assert report["heldout_examples"] == 1


def test_task_check_fails_below_min_accuracy(dm):
    prompt_ids = dm.tokenizer.encode("hello world")
    examples = task_examples(dm)
    wrong = [Example(e.input, e.output + " never") for e in examples]
    half = examples[:2] + wrong[2:]

    assert not TaskTerm(dm, wrong, output_prefix="").check(prompt_ids).success
    assert TaskTerm(dm, half, output_prefix="", min_accuracy=0.5).check(prompt_ids).success
    assert not TaskTerm(dm, half, output_prefix="", min_accuracy=1.0).check(prompt_ids).success


# -- composite ---------------------------------------------------------------------------


def test_composite_loss_is_weighted_sum(dm):
    string, draw = sample_prompt(dm)
    target = TargetObjective(dm, [5, 6, 7])
    fluency = FluencyTerm(dm)
    composite = CompositeObjective(dm, [(1.0, target), (0.5, fluency), (0.0, EntropyTerm(string))])

    out = composite.loss(draw.y)

    expected = target.loss(draw.y).per_sample + 0.5 * fluency.loss(draw.y).per_sample
    assert torch.allclose(out.per_sample, expected)
    assert set(out.terms) == {"target", "fluency"}
    assert out.solved is not None


def test_composite_success_needs_every_term(dm):
    ids = dm.tokenizer.encode("hello world")
    target = TargetObjective(dm, greedy_generate(dm, ids, 3))
    perplexity = prompt_perplexity(dm, dm.encode(""), ids)

    both = CompositeObjective(dm, [(1.0, target), (0.1, FluencyTerm(dm, max_perplexity=perplexity * 2))]).check(ids)
    strict = CompositeObjective(dm, [(1.0, target), (0.1, FluencyTerm(dm, max_perplexity=perplexity / 2))]).check(ids)

    assert both.success
    assert both.terms == {"target": True, "fluency": True}
    assert not strict.success
    assert strict.terms == {"target": True, "fluency": False}
    assert strict.output_ids == both.output_ids
    assert strict.metrics["prompt_perplexity"] == pytest.approx(perplexity)
    assert strict.metrics["fluency.perplexity"] == pytest.approx(perplexity)


def test_target_only_config_reports_prompt_perplexity(dm):
    config = Config(objective=ObjectiveConfig(target_ids=[5, 6, 7]))

    objective = build_objective(config, dm)
    result = objective.check(dm.tokenizer.encode("hello world"))

    assert objective.names == ["target"]
    assert result.metrics["prompt_perplexity"] > 1


def test_build_objective_turns_on_configured_terms(dm):
    config = Config(
        objective=ObjectiveConfig(target_ids=[5, 6]),
        fluency={"weight": 0.1},
        entropy={"weight": -0.01},
        keywords={"require": ["fox"]},
        task=TaskConfig(examples=[{"input": "cat", "output": "CAT"}, {"input": "dog", "output": "DOG"}]),
    )
    string, _ = sample_prompt(dm)

    objective = build_objective(config, dm, string)

    assert objective.names == ["target", "keywords", "task", "fluency", "entropy"]


def test_optimize_task_writes_report(dm, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"input": "{w}", "output": "{w.upper()}"}}\n' for w in ["cat", "dog", "fox", "owl"]))
    config = Config(
        prompt=PromptConfig(init_text="hello world", samples=2),
        objective=ObjectiveConfig(),
        task=TaskConfig(path=str(data), batch_size=2, heldout=0.25),
        fluency={"weight": 0.1},
        optimizer=OptimizerConfig(steps=3),
    )

    result = optimize(config, model=dm)

    report = result.summary()["report"]["task"]
    assert report["train_examples"] == 3
    assert report["heldout_examples"] == 1
    for key in ("train_accuracy_before", "train_accuracy_after", "heldout_accuracy_before", "heldout_accuracy_after"):
        assert 0.0 <= report[key] <= 1.0
    assert result.best.terms.keys() == {"task", "fluency"}
    assert "prompt_perplexity" in result.best.metrics


# -- vocabulary restriction --------------------------------------------------------------


def test_banned_token_mask_texts_and_ids(dm):
    tok = dm.tokenizer
    mask = banned_token_mask(tok, dm.vocab_size, texts=["ello"], ids=[3])

    for token_id in range(len(tok)):
        text = tok.decode([token_id])
        assert bool(mask[token_id]) == ("ello" in text or token_id == 3), (token_id, text)
    assert not mask[len(tok):].any()


def test_banned_token_ids_out_of_range(dm):
    with pytest.raises(ValueError, match="banned token ids must lie in"):
        banned_token_mask(dm.tokenizer, dm.vocab_size, ids=[dm.vocab_size])


def test_optimize_never_samples_banned_tokens(dm):
    config = Config(
        prompt=PromptConfig(init_text="hello world", samples=2, banned=["hello", " w"], banned_ids=[7]),
        objective=ObjectiveConfig(target_ids=[5, 6]),
        optimizer=OptimizerConfig(steps=3),
    )
    banned = banned_token_mask(dm.tokenizer, dm.vocab_size, ["hello", " w"], [7])

    result = optimize(config, model=dm)

    assert not result.string.vocab_mask[banned].any()
    assert not any(banned[i] for i in result.best.prompt_ids)
    assert not any(banned[i] for i in result.string.ids.tolist())


def test_banning_every_token_rejected(dm):
    config = Config(
        prompt=PromptConfig(length=2, banned_ids=list(range(len(dm.tokenizer)))),
        objective=ObjectiveConfig(target_ids=[5]),
    )

    with pytest.raises(ValueError, match="leave no token"):
        optimize(config, model=dm)


# -- chat template -----------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture()
def chat_tokenizer():
    tok = build_tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_chat_frame_user(chat_tokenizer):
    assert chat_frame(chat_tokenizer, "user", "A ", " B") == ("<user>A ", " B</user>\n<assistant>")


def test_chat_frame_system(chat_tokenizer):
    before, after = chat_frame(chat_tokenizer, "system", "", "", "hi")

    assert before == "<system>"
    assert after == "</system>\n<user>hi</user>\n<assistant>"


def test_chat_frame_none_keeps_text(chat_tokenizer):
    assert chat_frame(chat_tokenizer, "none", "a", "b") == ("a", "b")


def test_chat_frame_needs_template():
    with pytest.raises(ValueError, match="no chat template"):
        chat_frame(build_tiny_tokenizer(), "user")


def test_chat_objective_scores_after_template(chat_tokenizer):
    dm = STGSDiffModel(build_tiny_model("llama", len(chat_tokenizer)), chat_tokenizer)
    config = Config(prompt=PromptConfig(chat="user", prefix="Q: "), objective=ObjectiveConfig(target_ids=[5, 6]))

    objective = build_objective(config, dm)

    target = objective.target
    assert target.prefix == "<user>Q: "
    assert target.suffix == "</user>\n<assistant>"
    prompt_ids = dm.tokenizer.encode("hello")
    full = dm.tokenizer.encode(target.prefix) + prompt_ids + dm.tokenizer.encode(target.suffix)
    assert objective.check(prompt_ids).output_ids == greedy_generate(dm, full, 2)


# -- per-position constraints ------------------------------------------------------------


def test_position_mask_kinds(dm):
    tok = dm.tokenizer
    hello = tok.encode("hello")
    constraints = [
        {"position": 0, "text": "hello"},
        {"position": 2, "tokens": ["The", " the"]},
        {"position": 3, "chars": "digit"},
    ]

    mask = position_mask(tok, 4, dm.vocab_size, constraints)

    assert mask[0].nonzero().view(-1).tolist() == hello[:1]
    assert mask[1].all()
    assert sorted(mask[2].nonzero().view(-1).tolist()) == sorted(tok.encode("The") + tok.encode(" the"))
    for token_id in mask[3].nonzero().view(-1).tolist():
        assert tok.decode([token_id]).removeprefix(" ").isdigit()
    assert mask[3].any()


@pytest.mark.parametrize(
    ("constraints", "message"),
    [
        ([{"position": 4, "chars": "alpha"}], r"prompt.constraints\[0\]: position 4 is past"),
        ([{"position": 0, "tokens": ["hello world"]}], r"prompt.constraints\[0\].tokens: 'hello world' encodes to"),
        ([{"position": 1, "chars": "alpha"}, {"position": 1, "chars": "digit"}], r"already constrained by prompt.constraints\[0\]"),
    ],
)
def test_position_mask_errors(dm, constraints, message):
    with pytest.raises(ValueError, match=message):
        position_mask(dm.tokenizer, 4, dm.vocab_size, constraints)


def test_constrained_string_samples_allowed_tokens(dm, tmp_path):
    string = STGSDiffString(dm.tokenizer, length=3, vocab_size=dm.vocab_size)
    mask = position_mask(dm.tokenizer, 3, dm.vocab_size, [{"position": 1, "text": "hello"}, {"position": 2, "chars": "digit"}])
    string.constrain(mask)

    draw = string.sample(8, generator=torch.Generator().manual_seed(0))

    assert (draw.ids[:, 1] == dm.tokenizer.encode("hello")[0]).all()
    assert mask[2][draw.ids[:, 2]].all()
    assert mask[torch.arange(3), string.ids].all()
    string.save(tmp_path / "s")
    loaded = STGSDiffString.load(tmp_path / "s", dm.tokenizer)
    assert torch.equal(loaded.position_mask, mask)
    with pytest.raises(ValueError, match="per-position constraints"):
        string.insert(0)


def test_constrain_rejects_empty_position(dm):
    string = STGSDiffString(dm.tokenizer, length=2, vocab_size=dm.vocab_size)
    mask = torch.ones(2, dm.vocab_size, dtype=torch.bool)
    mask[1] = False

    with pytest.raises(ValueError, match=r"positions \[1\] have no token"):
        string.constrain(mask)


def test_optimize_keeps_constraints(dm):
    config = Config(
        prompt=PromptConfig(length=4, samples=2, constraints=[{"position": 0, "text": "hello"}, {"position": 3, "chars": "alpha"}]),
        objective=ObjectiveConfig(target_ids=[5, 6]),
        entropy={"weight": 0.1},
        optimizer=OptimizerConfig(steps=3),
    )

    result = optimize(config, model=dm)

    assert result.best.prompt_ids[0] == dm.tokenizer.encode("hello")[0]
    assert dm.tokenizer.decode([result.best.prompt_ids[3]]).removeprefix(" ").isalpha()


# -- ensemble ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_dm(dm):
    return STGSDiffModel(build_tiny_model("llama", dm.vocab_size, tie=True, seed=1), dm.tokenizer)


def test_ensemble_loss_is_mean_over_models(dm, second_dm):
    config = Config(objective=ObjectiveConfig(target_ids=[5, 6]), fluency={"weight": 0.1})
    string, draw = sample_prompt(dm)
    first, second = build_objective(config, dm, string), build_objective(config, second_dm, string)

    out = EnsembleObjective([first, second]).loss(draw.y)

    expected = (first.loss(draw.y).per_sample + second.loss(draw.y).per_sample) / 2
    assert torch.allclose(out.per_sample, expected)
    assert set(out.terms) == {"target", "fluency", "model1.target", "model1.fluency"}
    assert_reaches_prompt(string, out.per_sample)


def test_ensemble_check_needs_every_model(dm, second_dm):
    ids = dm.tokenizer.encode("hello world")
    target = greedy_generate(dm, ids, 3)
    config = Config(objective=ObjectiveConfig(target_ids=target))
    assert greedy_generate(second_dm, ids, 3) != target

    alone = build_objective(config, dm).check(ids)
    both = EnsembleObjective([build_objective(config, dm), build_objective(config, second_dm)]).check(ids)

    assert alone.success
    assert not both.success
    assert both.terms == {"target": True, "model1.target": False}
    assert "model1.prompt_perplexity" in both.metrics


def test_ensemble_rejects_other_vocabulary(dm):
    tok = build_tiny_tokenizer(vocab_size=280)
    other = STGSDiffModel(build_tiny_model("llama", len(tok)), tok)
    config = Config(objective=ObjectiveConfig(target_ids=[5]), optimizer=OptimizerConfig(steps=1))

    with pytest.raises(ValueError, match="does not share the first model's vocabulary"):
        optimize(config, model=dm, ensemble=[other])


def test_optimize_with_ensemble(dm, second_dm):
    config = Config(objective=ObjectiveConfig(target_ids=[5, 6]), prompt=PromptConfig(length=3, samples=2), optimizer=OptimizerConfig(steps=2))

    result = optimize(config, model=dm, ensemble=[second_dm])

    assert result.best.terms.keys() == {"target", "model1.target"}


# -- rendering ---------------------------------------------------------------------------


def start_event(target_text, target_ids, terms):
    return RunStarted(
        model="m", device="cpu", target_text=target_text, target_ids=target_ids, prompt_length=3,
        steps=1, samples=1, run_dir=None, terms=terms,
    )


@pytest.mark.parametrize(
    ("target_text", "target_ids", "terms", "expected"),
    [
        (" Paris", [5], ["target"], 'target " Paris" (1 tokens)'),
        (" Paris", [5], ["target", "fluency"], 'target " Paris" (1 tokens), terms fluency'),
        ("", [], ["keywords", "entropy"], "terms keywords, entropy"),
    ],
)
def test_describe_objective(target_text, target_ids, terms, expected):
    assert describe_objective(start_event(target_text, target_ids, terms)) == expected


@pytest.mark.parametrize("model_name", ["dm", "gpt2_dm"])
def test_target_loss_same_without_prefix_cache(model_name, request):
    model = request.getfixturevalue(model_name)
    objective = TargetObjective(model, [5, 6, 7], prefix="hello world")
    prompt = F.one_hot(torch.tensor([[8, 9, 10, 11], [12, 13, 14, 15]]), model.vocab_size).float()  # (2, 4, V)
    assert objective.prefix_cache is not None

    cached = objective.loss(prompt).per_sample
    objective.prefix_cache = None  # what a model without a reusable KV cache gets
    recomputed = objective.loss(prompt).per_sample

    torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=1e-5)


def _drafts(plain: list[int], vocab_size: int) -> list[list[int]]:
    """Drafts against a plain greedy output: itself, one token off at the start, middle and end,
    an unrelated draft, and a draft shorter than the output."""
    drafts = [list(plain), list(plain[:3]), [(t * 7 + 3) % vocab_size for t in plain]]
    for position in (0, len(plain) // 2, len(plain) - 1):
        wrong = list(plain)
        wrong[position] = (wrong[position] + 1) % vocab_size
        drafts.append(wrong)
    return drafts


def test_drafted_generation_equals_plain(tiny_lm):
    model, tokenizer = tiny_lm
    dm = STGSDiffModel(model, tokenizer)
    for text in ("hello world", "The quick brown fox", "12345"):
        ids = tokenizer.encode(text)
        plain = greedy_generate(dm, ids, 8)
        for draft in _drafts(plain, dm.vocab_size):
            assert greedy_generate(dm, ids, 8, draft=draft) == plain, (text, draft)


def test_drafted_generation_stops_at_eos(tiny_tokenizer):
    dm = STGSDiffModel(build_tiny_model("llama", len(tiny_tokenizer)), tiny_tokenizer)
    ids = tiny_tokenizer.encode("hello world")
    dm.model.generation_config.eos_token_id = None
    free = greedy_generate(dm, ids, 8)
    # Make the third generated token an end-of-sequence token: plain generation stops there.
    dm.model.generation_config.eos_token_id = free[2]
    stop = free.index(free[2]) + 1
    plain = greedy_generate(dm, ids, 8)

    assert plain == free[:stop]
    assert greedy_generate(dm, ids, 8, draft=free) == plain


def test_target_check_equals_plain_greedy(dm):
    ids = dm.tokenizer.encode("hello world")
    reachable = greedy_generate(dm, ids, 4)
    for target in (reachable, reachable[:2] + [(reachable[2] + 1) % dm.vocab_size, reachable[3]]):
        check = TargetObjective(dm, target).check(ids)

        assert check.output_ids == reachable
        assert check.success is (target == reachable)


def _count_generate_calls(dm, monkeypatch) -> list[int]:
    calls = []
    generate = dm.model.generate

    def counted(*args, **kwargs):
        calls.append(1)
        return generate(*args, **kwargs)

    monkeypatch.setattr(dm.model, "generate", counted)
    return calls


def test_reproduced_draft_skips_generate(dm, monkeypatch):
    ids = dm.tokenizer.encode("hello world")
    plain = greedy_generate(dm, ids, 6)
    calls = _count_generate_calls(dm, monkeypatch)

    assert greedy_generate(dm, ids, 6, draft=plain) == plain
    assert calls == []


def test_repetition_penalty_uses_plain_generate(dm, monkeypatch):
    monkeypatch.setattr(dm.model.generation_config, "repetition_penalty", 5.0)
    ids = dm.tokenizer.encode("hello world")
    plain = greedy_generate(dm, ids, 6)
    calls = _count_generate_calls(dm, monkeypatch)

    assert greedy_generate(dm, ids, 6, draft=plain) == plain
    assert calls == [1]


def test_near_tie_in_draft_uses_plain_generate(dm, monkeypatch):
    import sdlm.objectives as objectives

    ids = dm.tokenizer.encode("hello world")
    plain = greedy_generate(dm, ids, 6)
    under_draft = objectives._greedy_under_draft

    def tied(model, ids, draft):
        tokens, margins, tolerance = under_draft(model, ids, draft)
        return tokens, [0.0] * len(margins), tolerance

    monkeypatch.setattr(objectives, "_greedy_under_draft", tied)
    calls = _count_generate_calls(dm, monkeypatch)

    assert greedy_generate(dm, ids, 6, draft=plain) == plain
    assert calls == [1]
