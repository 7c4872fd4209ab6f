import logging

import pytest
import torch
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from conftest import build_tiny_model, build_tiny_tokenizer
from sdlm import STGSDiffModel
from sdlm.objectives import TargetObjective, greedy_generate


@pytest.fixture()
def tiny_dm():
    tok = build_tiny_tokenizer()
    return STGSDiffModel(build_tiny_model("llama", len(tok)), tok)


def test_target_ids_have_no_bos_even_if_tokenizer_adds_one():
    tok = build_tiny_tokenizer()
    backend = tok.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    bos_tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>")
    assert bos_tok("hello").input_ids[0] == 0  # the tokenizer itself adds BOS
    dm = STGSDiffModel(build_tiny_model("llama", len(bos_tok)), bos_tok)
    objective = TargetObjective.from_text(dm, " hello world")
    assert objective.target_ids[0].tolist() == bos_tok.encode(" hello world", add_special_tokens=False)
    assert 0 not in objective.target_ids[0].tolist()


def test_target_with_leading_newline_keeps_its_ids(tiny_dm):
    text = "\n\nThe end."
    objective = TargetObjective.from_text(tiny_dm, text)
    assert objective.target_ids[0].tolist() == tiny_dm.tokenizer.encode(text)
    assert objective.target_text == text


def test_suffix_merging_with_target_is_logged(tiny_dm, caplog):
    tok = tiny_dm.tokenizer
    # "hel" + "lo" merge into other tokens when encoded together.
    assert tok.encode("hel") + tok.encode("lo world") != tok.encode("hello world")
    with caplog.at_level(logging.WARNING, logger="sdlm"):
        objective = TargetObjective.from_text(tiny_dm, "lo world", suffix="hel")
    assert "tokenize differently" in caplog.text
    assert objective.target_ids[0].tolist() == tok.encode("lo world")


def test_check_reports_text_round_trip(tiny_dm):
    tok = tiny_dm.tokenizer
    merged = tok.encode("hello")
    split = tok.encode("hel") + tok.encode("lo")
    assert merged != split
    target = greedy_generate(tiny_dm, split, 3)
    check = TargetObjective(tiny_dm, target).check(split)
    assert check.success
    assert check.prompt_text == "hello"
    assert not check.text_ids_same
    expected_text_success = greedy_generate(tiny_dm, merged, 3) == target
    assert check.text_success is expected_text_success


def test_teacher_forced_solved_flag_agrees_with_greedy(tiny_dm):
    prompt = tiny_dm.tokenizer.encode("The quick")
    target = greedy_generate(tiny_dm, prompt, 4)
    objective = TargetObjective(tiny_dm, target)
    one_hot = torch.nn.functional.one_hot(torch.tensor([prompt]), tiny_dm.vocab_size).float()
    scored = objective.loss(one_hot)
    assert scored.per_sample.shape == (1,)
    assert scored.solved.tolist() == [True]
    assert scored.accuracy.tolist() == [1.0]


def test_empty_target_rejected(tiny_dm):
    with pytest.raises(ValueError, match="empty"):
        TargetObjective(tiny_dm, [])


@pytest.mark.parametrize("target_length", [1, 4])
def test_teacher_forced_logits_match_plain_forward(tiny_lm, target_length):
    # The objective leaves the last target token out of its input: the logits must still equal
    # those of the model's own forward pass over prefix + prompt + suffix + the whole target.
    model, tok = tiny_lm
    dm = STGSDiffModel(model, tok)
    prefix, suffix = tok.encode("Say:"), tok.encode(" now")
    prompt, target = tok.encode("The quick"), tok.encode(" brown fox jumps over")[:target_length]
    objective = TargetObjective(dm, target, prefix="Say:", suffix=" now")
    one_hot = torch.nn.functional.one_hot(torch.tensor([prompt]), dm.vocab_size).float()
    logits = objective.teacher_forced_logits(one_hot)  # (1, T, V)
    ids = torch.tensor([prefix + prompt + suffix + target])
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, -target_length - 1 : -1, : dm.vocab_size]
    assert logits.shape == (1, target_length, dm.vocab_size)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
