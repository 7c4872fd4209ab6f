"""The discrete polish: scoring by greedy prefix, gradient-ranked swaps, and its use in the loop."""

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from sdlm import STGSDiffModel
from sdlm.config import Config, ConfigError, EvalConfig, ObjectiveConfig, OptimizerConfig, PromptConfig, SearchConfig
from sdlm.objectives import TargetObjective, greedy_generate
from sdlm.optimize import MAX_MEND_CHECKS, StepEvent, mend_joins, optimize
import sdlm.polish as polish_module
from sdlm.polish import (
    Polisher, Scored, join_repairs, matched_prefix, reencodes, score_prompts, swap_candidates, target_copy,
)


@pytest.fixture(scope="module")
def tiny_dm():
    tok = build_tiny_tokenizer()
    return STGSDiffModel(build_tiny_model("llama", len(tok)), tok)


def test_matched_prefix_counts_leading_hits():
    hits = torch.tensor([[True, True, False, True], [False, True, True, True], [True, True, True, True]])
    assert matched_prefix(hits).tolist() == [2, 0, 4]


def test_score_matches_greedy_prefix(tiny_dm):
    prompts = torch.tensor([[10, 20, 30, 40], [50, 60, 70, 80], [90, 100, 110, 120]])
    target = greedy_generate(tiny_dm, prompts[0].tolist(), 5)
    objective = TargetObjective(tiny_dm, target)
    scored = score_prompts(objective, prompts, chunk=2)
    for row, result in zip(prompts.tolist(), scored):
        output = greedy_generate(tiny_dm, row, 5)
        expected = next((i for i, (a, b) in enumerate(zip(output, target)) if a != b), len(target))
        assert result.ids == tuple(row)
        assert result.matched == expected
    assert scored[0].matched == 5


def test_swaps_change_one_allowed_token(tiny_dm):
    objective = TargetObjective(tiny_dm, [5, 6, 7])
    allowed = torch.zeros(tiny_dm.vocab_size, dtype=torch.bool)
    allowed[100:140] = True
    start = score_prompts(objective, torch.tensor([[100, 101, 102, 103]]))[0]
    generator = torch.Generator().manual_seed(0)
    candidates = swap_candidates(objective, start, allowed, width=64, topk=8, generator=generator)
    assert candidates.shape[1] == 4
    assert 1 <= candidates.shape[0] <= 64
    assert len({tuple(row) for row in candidates.tolist()}) == candidates.shape[0]
    changed = candidates != torch.tensor([100, 101, 102, 103])
    assert (changed.sum(-1) == 1).all()
    assert allowed[candidates].all()


def test_polish_repairs_one_wrong_token(tiny_dm):
    # The target is reachable from a known prompt, and the search starts one token away from it.
    solution = [120, 121, 122, 123]
    target = greedy_generate(tiny_dm, solution, 3)
    objective = TargetObjective(tiny_dm, target)
    allowed = torch.zeros(tiny_dm.vocab_size, dtype=torch.bool)
    allowed[100:130] = True
    # The first single-token change within the allowed range that breaks the output.
    broken = next(
        prompt for pos in range(4) for t in range(100, 130)
        if greedy_generate(tiny_dm, prompt := solution[:pos] + [t] + solution[pos + 1:], 3) != target
    )
    polisher = Polisher(objective, allowed, width=64, topk=30, generator=torch.Generator().manual_seed(0))
    start = polisher.offer(torch.tensor([broken]))
    assert start.matched < len(target)
    for _ in range(4):
        found = polisher.polish()
    assert found.key >= start.key
    assert polisher.solved
    assert greedy_generate(tiny_dm, list(found.ids), len(target)) == target


def test_polish_never_makes_the_incumbent_worse(tiny_dm):
    objective = TargetObjective(tiny_dm, [5, 6, 7, 8, 9])
    polisher = Polisher(objective, torch.ones(tiny_dm.vocab_size, dtype=torch.bool), width=8, topk=4)
    keys = [polisher.offer(torch.tensor([[30, 31, 32]])).key]
    for _ in range(5):
        keys.append(polisher.polish().key)
    assert keys == sorted(keys)


def test_polish_moves_track_to_worse_swap(tiny_dm, monkeypatch):
    """A round moves the current prompt to its best swap even when that swap ranks below the
    incumbent, which stays the best prompt reached."""
    polisher = Polisher(
        TargetObjective(tiny_dm, [5, 6, 7, 8, 9]), torch.ones(tiny_dm.vocab_size, dtype=torch.bool), width=8,
        topk=4, generator=torch.Generator().manual_seed(0),
    )
    start = polisher.offer(torch.tensor([[30, 31, 32]]))

    def score_below_start(objective, prompt_ids, chunk=64):
        # Every swap gets as many leading tokens right as the start, at a higher loss.
        return [Scored(tuple(row), start.matched, start.loss + 1 + i) for i, row in enumerate(prompt_ids.tolist())]

    monkeypatch.setattr(polish_module, "score_prompts", score_below_start)
    incumbent = polisher.polish()

    assert incumbent == start
    assert polisher.track.loss == start.loss + 1
    assert sum(a != b for a, b in zip(polisher.track.ids, start.ids)) == 1


def test_polish_needs_an_offer_first(tiny_dm):
    polisher = Polisher(TargetObjective(tiny_dm, [5]), torch.ones(tiny_dm.vocab_size, dtype=torch.bool))
    with pytest.raises(ValueError, match="offer"):
        polisher.polish()


def test_loop_with_search_aids_succeeds(tiny_dm):
    target = greedy_generate(tiny_dm, tiny_dm.tokenizer.encode("hello world"), 3)
    config = Config(
        prompt=PromptConfig(length=3, samples=2),
        objective=ObjectiveConfig(target_ids=target),
        optimizer=OptimizerConfig(steps=60),
        eval=EvalConfig(every=5),
        search=SearchConfig(polish_every=1, polish_width=64, polish_from="best", polish_after=0, restart_patience=5),
    )
    result = optimize(config, model=tiny_dm)
    assert result.success
    assert greedy_generate(tiny_dm, result.best.prompt_ids, len(target)) == target


def test_restarts_counted_in_step_events(tiny_dm):
    config = Config(
        prompt=PromptConfig(length=3, samples=1),
        objective=ObjectiveConfig(target_ids=[5, 6, 7, 8, 9, 10]),
        optimizer=OptimizerConfig(steps=12, lr=1e-6),  # Too small to lower the loss, so restarts fire.
        search=SearchConfig(restart_patience=2, restart_bias=0.0),
    )
    steps = []
    result = optimize(config, model=tiny_dm, on_event=lambda e: steps.append(e) if isinstance(e, StepEvent) else None)
    counts = [e.restarts for e in steps]

    assert result.steps == 12
    assert counts == sorted(counts)
    assert counts[-1] >= 2
    # The argmax prompt changes after each unbiased restart.
    assert len({e.prompt_text for e in steps}) > 2


@pytest.mark.parametrize(
    "every, after, rounds",
    [(3, 0, {3, 6}), (2, 3, {4, 6}), (2, 2, {4, 6})],
    ids=["every-3", "after-3", "after-2"],  # after 2: step 2 is the last relaxed step alone
)
def test_polish_rounds_follow_schedule(tiny_dm, every, after, rounds):
    """Polish steps, which report the incumbent's matched tokens, are the multiples of
    polish_every after polish_after."""
    config = Config(
        prompt=PromptConfig(length=3, samples=1),
        objective=ObjectiveConfig(target_ids=[5, 6, 7, 8, 9, 10]),
        optimizer=OptimizerConfig(steps=6),
        search=SearchConfig(polish_every=every, polish_after=after, polish_width=8),
    )
    steps = []
    optimize(config, model=tiny_dm, on_event=lambda e: steps.append(e) if isinstance(e, StepEvent) else None)

    assert [e.polish_matched is not None for e in steps] == [step in rounds for step in range(1, 7)]


def test_polish_off_without_a_target(tiny_dm):
    config = Config(
        keywords={"require": ["cat"], "max_new_tokens": 2},
        prompt=PromptConfig(length=3, samples=1),
        optimizer=OptimizerConfig(steps=3),
        search=SearchConfig(polish_every=1, polish_after=0),
    )
    steps = []
    optimize(config, model=tiny_dm, on_event=lambda e: steps.append(e) if isinstance(e, StepEvent) else None)

    assert len(steps) == 3
    assert all(e.polish_matched is None for e in steps)


def test_restart_returns_to_the_initial_text(tiny_dm):
    from sdlm.stgs_diff_string import STGSDiffString

    string = STGSDiffString(tiny_dm.tokenizer, init_text="hello world", init_scale=5.0, vocab_size=tiny_dm.vocab_size)
    start = string.logits.detach().clone()
    with torch.no_grad():
        string.logits.add_(torch.randn_like(string.logits))
    parameter = string.logits

    string.reinitialize(torch.Generator().manual_seed(0))

    assert string.logits is parameter
    assert torch.equal(string.logits.detach(), start)


def test_restart_bias_raises_the_given_tokens(tiny_dm):
    from sdlm.stgs_diff_string import STGSDiffString

    string = STGSDiffString(tiny_dm.tokenizer, length=4, vocab_size=tiny_dm.vocab_size)
    string.reinitialize(torch.Generator().manual_seed(1))
    plain = string.logits.detach().clone()
    around = [3, 40, 41, 3]

    string.reinitialize(torch.Generator().manual_seed(1), around=around, bias=2.5)

    difference = string.logits.detach() - plain  # (1, 4, V)
    assert torch.allclose(difference[0, torch.arange(4), around], torch.full((4,), 2.5))
    assert difference.abs().sum().item() == pytest.approx(4 * 2.5)
    with pytest.raises(ValueError, match="one id per position"):
        string.reinitialize(around=[3, 40], bias=1.0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        string.reinitialize(around=[3, 40, -1, 3], bias=1.0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        string.reinitialize(around=[3, 40, tiny_dm.vocab_size, 3], bias=1.0)


def record_restarts_and_draws(monkeypatch) -> tuple[list[tuple[list[int], float]], list]:
    """Patch STGSDiffString to record (around, bias) of each restart and the STGS draw of each step."""
    from sdlm.stgs_diff_string import STGSDiffString

    restarts: list[tuple[list[int], float]] = []
    drawn: list = []
    reinitialize, sample = STGSDiffString.reinitialize, STGSDiffString.sample

    def record_restart(self, generator=None, *, around=None, bias=0.0):
        restarts.append((list(around), bias))
        reinitialize(self, generator, around=around, bias=bias)

    def record_sample(self, *args, **kwargs):
        drawn.append(sample(self, *args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(STGSDiffString, "reinitialize", record_restart)
    monkeypatch.setattr(STGSDiffString, "sample", record_sample)
    return restarts, drawn


def test_biased_restart_follows_best_sample(tiny_dm, monkeypatch):
    """Each biased restart starts near the sample with the most target tokens right so far,
    then the lowest loss, over all samples of all earlier steps."""
    import dataclasses

    from sdlm.objectives import TargetObjective

    config = Config(
        prompt=PromptConfig(length=3, samples=3),
        objective=ObjectiveConfig(target_ids=[5, 6, 7, 8, 9, 10]),
        optimizer=OptimizerConfig(steps=12, lr=1e-6),  # Too small to lower the loss, so restarts fire.
        search=SearchConfig(restart_patience=2, restart_bias=100.0),
    )
    restarts, drawn = record_restarts_and_draws(monkeypatch)
    samples: list[list[tuple[float, float, list[int]]]] = []  # per step: (accuracy, loss, ids) of each sample
    loss = TargetObjective.loss

    def record_loss(self, prompt_y):
        # The sample with the highest loss gets the highest accuracy, so the anchor must follow
        # the accuracy rather than the loss.
        out = loss(self, prompt_y)
        out = dataclasses.replace(out, accuracy=out.per_sample.detach().argsort().argsort().float() / len(out.per_sample))
        ids = drawn[-1].ids.tolist()
        samples.append([(float(a), float(l), i) for a, l, i in zip(out.accuracy, out.per_sample, ids)])
        return out

    monkeypatch.setattr(TargetObjective, "loss", record_loss)
    events = []
    result = optimize(config, model=tiny_dm, on_event=events.append)
    steps = [e for e in events if isinstance(e, StepEvent)]
    restart_steps = [later.step for earlier, later in zip(steps, steps[1:]) if later.restarts > earlier.restarts]
    if steps[0].restarts:
        restart_steps.insert(0, steps[0].step)
    assert len(restarts) == len(restart_steps) >= 2
    assert len(samples) == result.steps

    for (around, bias), step in zip(restarts, restart_steps):
        seen = [s for per_step in samples[:step] for s in per_step]  # every sample up to the restart
        best_key = max((accuracy, -loss) for accuracy, loss, _ in seen)
        assert bias == 100.0
        assert around in [ids for accuracy, loss, ids in seen if (accuracy, -loss) == best_key]

    # The step after a restart has that sample as its argmax, because its tokens lead every
    # other logit by about 100.
    followed = [(around, step) for (around, _), step in zip(restarts, restart_steps) if step < result.steps]
    assert followed
    for around, step in followed:
        after = next(e for e in steps if e.step == step + 1)
        assert after.prompt_text == tiny_dm.tokenizer.decode(around, clean_up_tokenization_spaces=False)


def test_restart_anchor_skips_nan_samples(tiny_dm, monkeypatch):
    """A sample with a non-finite loss never becomes the anchor, even with the best accuracy."""
    import dataclasses

    from sdlm.objectives import TargetObjective

    config = Config(
        prompt=PromptConfig(length=3, samples=2),
        objective=ObjectiveConfig(target_ids=[5, 6, 7, 8]),
        optimizer=OptimizerConfig(steps=8, lr=1e-6),  # Too small to lower the loss, so restarts fire.
        search=SearchConfig(restart_patience=2, restart_bias=100.0),
    )
    restarts, drawn = record_restarts_and_draws(monkeypatch)
    finite_ids: list[list[int]] = []  # the ids of sample 1, the only sample with a finite loss
    loss = TargetObjective.loss

    def nan_first_sample(self, prompt_y):
        out = loss(self, prompt_y)
        per_sample = out.per_sample.clone()
        per_sample[0] = float("nan")
        finite_ids.append(drawn[-1].ids[1].tolist())
        return dataclasses.replace(out, per_sample=per_sample, accuracy=torch.tensor([1.0, 0.0]))

    monkeypatch.setattr(TargetObjective, "loss", nan_first_sample)
    optimize(config, model=tiny_dm)

    assert restarts
    for around, _ in restarts:
        assert around in finite_ids


def test_target_copy_fills_gaps_from_fallback():
    allowed = torch.ones(50, dtype=torch.bool)
    fallback = torch.tensor([40, 41, 42, 43])

    assert target_copy(torch.tensor([5, 6, 7, 8, 9, 10]), fallback, allowed).tolist() == [5, 6, 7, 8]
    assert target_copy(torch.tensor([5, 6]), fallback, allowed).tolist() == [5, 6, 42, 43]
    allowed[6] = False
    assert target_copy(torch.tensor([5, 6, 7]), fallback, allowed).tolist() == [5, 41, 7, 43]
    per_position = torch.ones(4, 50, dtype=torch.bool)
    per_position[2, 7] = False
    assert target_copy(torch.tensor([5, 6, 7]), fallback, per_position).tolist() == [5, 6, 42, 43]


def test_swaps_with_tokenizer_survive_reencode(tiny_dm):
    tok = tiny_dm.tokenizer
    objective = TargetObjective(tiny_dm, [5, 6, 7])
    allowed = torch.ones(tiny_dm.vocab_size, dtype=torch.bool)
    start = score_prompts(objective, torch.tensor([tok.encode("hello world")]))[0]

    def reencodes(row):
        return tok.encode(tok.decode(row), add_special_tokens=False) == row

    plain = swap_candidates(objective, start, allowed, width=64, topk=32, generator=torch.Generator().manual_seed(0))
    assert not all(reencodes(row) for row in plain.tolist())
    stable = swap_candidates(
        objective, start, allowed, width=64, topk=32, generator=torch.Generator().manual_seed(0), tokenizer=tok
    )
    assert stable.shape[0] >= 1
    assert all(reencodes(row) for row in stable.tolist())


def test_join_repairs_change_the_split_span():
    tok = build_tiny_tokenizer()
    dog = tok.encode(" dog")
    split_the = [264, 258]  # " t" + "he": its text encodes as the one token " the"
    assert tok.decode(split_the) == " the"
    assert tok.encode(" the") == [284]
    ids = dog + split_the + dog  # positions 3 and 4 re-encode as one token
    V = len(tok)
    scores = torch.zeros(len(ids), V)  # (L, V)
    scores[4, dog[0]] = 5.0  # the relaxed prompt's favourite at position 4: " d"
    allowed = torch.ones(V, dtype=torch.bool)
    candidates = join_repairs(tok, ids, scores, allowed, per_position=4).tolist()

    assert ids[:3] + [264, dog[0]] + ids[5:] in candidates
    for row in candidates:
        changed = [i for i, (a, b) in enumerate(zip(row, ids)) if a != b]
        assert len(changed) == 1
        assert changed[0] in (3, 4)
        assert reencodes(tok, row)


def test_join_repairs_skip_stable_prompt():
    tok = build_tiny_tokenizer()
    ids = tok.encode("hello world")
    V = len(tok)
    candidates = join_repairs(tok, ids, torch.zeros(len(ids), V), torch.ones(V, dtype=torch.bool))
    assert candidates.shape == (0, len(ids))


def test_mend_joins_fixes_text_check():
    tok = build_tiny_tokenizer()
    dm = STGSDiffModel(build_tiny_model("gpt2", len(tok), seed=2), tok)
    ids = [288, 264, 258, 288]  # "12" + " t" + "he" + "12": the text re-encodes " the" as one token
    objective = TargetObjective(dm, greedy_generate(dm, ids, 1))
    check = objective.check(ids)
    assert check.success and not check.text_success  # the premise: ids work, text does not
    V = len(tok)
    checked = {tuple(ids)}
    mended = mend_joins(objective, objective, check, torch.zeros(len(ids), V), torch.ones(V, dtype=torch.bool), checked)

    assert mended is not None
    assert mended.success
    assert mended.text_success
    changed = [i for i, (a, b) in enumerate(zip(mended.prompt_ids, ids)) if a != b]
    assert len(changed) == 1
    assert changed[0] in (1, 2)
    assert tuple(mended.prompt_ids) in checked
    assert len(checked) <= 1 + MAX_MEND_CHECKS


def test_polish_from_target_keeps_its_own_track(tiny_dm, monkeypatch):
    """With polish_from target, the polish starts at the target's own tokens, and the relaxed
    search's prompts are never offered to it."""
    offered, polished_from = [], []
    offer, polish = Polisher.offer, Polisher.polish

    def record_offer(self, prompt_ids):
        offered.append(prompt_ids.tolist())
        return offer(self, prompt_ids)

    def record_polish(self):
        polished_from.append(list((self.track or self.incumbent).ids))
        return polish(self)

    monkeypatch.setattr(Polisher, "offer", record_offer)
    monkeypatch.setattr(Polisher, "polish", record_polish)
    config = Config(
        prompt=PromptConfig(length=3, samples=1),
        objective=ObjectiveConfig(target_ids=[5, 6, 7, 8, 9, 10]),
        optimizer=OptimizerConfig(steps=4),
        search=SearchConfig(polish_every=1, polish_width=8, polish_from="target", polish_after=0),
    )
    optimize(config, model=tiny_dm)

    assert offered == [[[5, 6, 7]]]
    assert len(polished_from) == 4
    assert polished_from[0] == [5, 6, 7]


def test_polish_leaves_relaxed_draws_unchanged(tiny_dm):
    """The relaxed search samples the same prompts with and without the polish."""

    def sampled_prompts(polish_every):
        config = Config(
            prompt=PromptConfig(length=3, samples=1),
            objective=ObjectiveConfig(target_ids=[5, 6, 7, 8, 9, 10]),
            optimizer=OptimizerConfig(steps=6),
            search=SearchConfig(polish_every=polish_every, polish_width=8, polish_after=0, restart_patience=2),
        )
        steps = []
        optimize(config, model=tiny_dm, on_event=lambda e: steps.append(e) if isinstance(e, StepEvent) else None)
        return [(e.prompt_text, e.loss, e.restarts) for e in steps]

    assert sampled_prompts(2) == sampled_prompts(0)


def test_target_copy_that_already_works_is_checked(tiny_dm):
    # This random model continues [4, 4, 4] with [4, 4, 4], so the target copy is a solution
    # before any swap, and no swap can improve it.
    assert greedy_generate(tiny_dm, [4, 4, 4], 3) == [4, 4, 4]
    config = Config(
        prompt=PromptConfig(length=3, samples=1),
        objective=ObjectiveConfig(target_ids=[4, 4, 4]),
        optimizer=OptimizerConfig(steps=3),
        eval=EvalConfig(every=100),
        search=SearchConfig(polish_every=1, polish_after=0, polish_width=8),
    )
    result = optimize(config, model=tiny_dm)

    assert result.success
    assert result.steps == 1
    assert result.best.prompt_ids == [4, 4, 4]


def test_unstable_incumbent_keeps_all_swaps(tiny_dm):
    tok = tiny_dm.tokenizer
    h, en = tok.convert_tokens_to_ids("h"), tok.convert_tokens_to_ids("en")
    # "h" + "en" encodes as "he" + "n", so the incumbent does not re-encode to itself.
    incumbent_ids = [h, en, 40, 41]
    objective = TargetObjective(tiny_dm, [5, 6, 7])
    allowed = torch.ones(tiny_dm.vocab_size, dtype=torch.bool)
    start = score_prompts(objective, torch.tensor([incumbent_ids]))[0]

    plain = swap_candidates(objective, start, allowed, width=16, topk=8, generator=torch.Generator().manual_seed(0))
    filtered = swap_candidates(
        objective, start, allowed, width=16, topk=8, generator=torch.Generator().manual_seed(0), tokenizer=tok
    )

    assert plain.shape[0] >= 1
    assert torch.equal(filtered, plain)
