import pytest
import torch
import torch.nn.functional as F

from sdlm import STGS, STGSDiffModel, STGSDiffString

GREEDY = dict(noise_scale=0.0, hard=True)


def hf_greedy(model, input_ids, attention_mask, n):
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=n, do_sample=False,
        pad_token_id=1, eos_token_id=None,
    )
    return out[:, input_ids.shape[1]:]


def test_generate_matches_hf_greedy(tiny_lm):
    model, tok = tiny_lm
    dm = STGSDiffModel(model, tok)
    ids = torch.tensor([tok.encode("The quick brown fox")])
    out = dm.generate(input_ids=ids, max_new_tokens=12, **GREEDY)
    expected = hf_greedy(model, ids, torch.ones_like(ids), 12)
    assert out.ids.shape == (1, 12)
    assert torch.equal(out.ids, expected)
    assert out.y.shape == (1, 12, dm.vocab_size)
    assert out.text[0] == tok.decode(expected[0].tolist(), clean_up_tokenization_spaces=False)


def test_generate_left_padded_batch_matches_hf(tiny_lm):
    model, tok = tiny_lm
    dm = STGSDiffModel(model, tok)
    texts = ["hello world", "The quick brown fox jumps", "A"]
    rows = [tok.encode(t) for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[1] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = dm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **GREEDY)
    expected = hf_greedy(model, ids, mask, 8)
    assert out.ids.shape == (3, 8)
    assert torch.equal(out.ids, expected)
    # Each row equals its own unpadded generation.
    for i, row in enumerate(rows):
        single = dm.generate(input_ids=torch.tensor([row]), max_new_tokens=8, **GREEDY)
        assert torch.equal(single.ids[0], out.ids[i])


def test_generate_from_one_hot_matches_ids(tiny_lm):
    model, tok = tiny_lm
    dm = STGSDiffModel(model, tok)
    ids = torch.tensor([tok.encode("hello model")])
    one_hot = torch.nn.functional.one_hot(ids, dm.vocab_size).float()
    a = dm.generate(one_hot=one_hot, max_new_tokens=6, **GREEDY)
    b = dm.generate(input_ids=ids, max_new_tokens=6, **GREEDY)
    assert torch.equal(a.ids, b.ids)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)


def test_one_token_prompt_matches_input_ids_path(tiny_lm):
    model, tok = tiny_lm
    dm = STGSDiffModel(model, tok)
    ids = torch.tensor([[5]])
    one_hot = torch.nn.functional.one_hot(ids, dm.vocab_size).float()
    ours = dm(one_hot=one_hot).logits
    plain = model(input_ids=ids).logits
    assert ours.shape == (1, 1, dm.vocab_size)
    assert torch.allclose(ours, plain, atol=1e-4)
    out = dm.generate(one_hot=one_hot, max_new_tokens=5, **GREEDY)
    assert out.ids.shape == (1, 5)
    assert torch.equal(out.ids, hf_greedy(model, ids, torch.ones_like(ids), 5))


def test_gradient_flows_from_generated_tokens_to_prompt(tiny_lm):
    model, tok = tiny_lm
    dm = STGSDiffModel(model, tok, stgs=STGS(temperature=0.5))
    prompt = STGSDiffString(tok, length=4, vocab_size=dm.vocab_size)
    draw = prompt.sample(2, generator=torch.Generator().manual_seed(0))
    out = dm.generate(parts=["hello", draw.y, " world"], max_new_tokens=5, generator=torch.Generator().manual_seed(1))
    assert out.y.shape == (2, 5, dm.vocab_size)
    target = torch.randint(0, len(tok), (2, 5), generator=torch.Generator().manual_seed(2))
    loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, dm.vocab_size), target.view(-1))
    loss.backward()
    assert prompt.logits.grad is not None
    assert prompt.logits.grad.abs().sum() > 0


def test_model_parameters_frozen_and_unchanged(tiny_lm):
    model, tok = tiny_lm
    dm = STGSDiffModel(model, tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = STGSDiffString(tok, length=3, vocab_size=dm.vocab_size)
    optimizer = torch.optim.Adam(prompt.parameters(), lr=1.0)
    labels_ids = dm.encode(" fox")
    draw = prompt.sample(2)
    out = dm(parts=[draw.y, labels_ids])
    target_logits = out.logits[:, prompt.length - 1:-1]
    loss = torch.nn.functional.cross_entropy(target_logits.reshape(-1, dm.vocab_size), labels_ids.expand(2, -1).reshape(-1))
    loss.backward()
    optimizer.step()
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_stop_at_eos_pads_finished_rows(tiny_lm):
    model, tok = tiny_lm
    dm = STGSDiffModel(model, tok)
    ids = torch.tensor([tok.encode("hello world")])
    free = dm.generate(input_ids=ids, max_new_tokens=6, **GREEDY)
    # Make the 3rd generated token the EOS token for this model.
    eos = int(free.ids[0, 2])
    model.generation_config.eos_token_id = eos
    out = dm.generate(input_ids=ids, max_new_tokens=6, stop_at_eos=True, **GREEDY)
    assert out.lengths.tolist() == [3 if eos not in free.ids[0, :2].tolist() else free.ids[0].tolist().index(eos) + 1]
    n = int(out.lengths[0])
    assert out.ids.shape[1] == n  # every row finished, so generation ended early
    assert torch.equal(out.ids[0, :n], free.ids[0, :n])


def test_stop_at_eos_in_batch_keeps_length():
    # A batch where one row stops: the other still gets all tokens, the stopped one gets pad.
    from conftest import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_model("llama", len(tok))
    dm = STGSDiffModel(model, tok)
    a = dm.generate(input_ids=torch.tensor([tok.encode("hello")]), max_new_tokens=6, **GREEDY).ids[0]
    b = dm.generate(input_ids=torch.tensor([tok.encode("The end")]), max_new_tokens=6, **GREEDY).ids[0]
    eos = next(int(t) for t in a[:3] if int(t) not in b.tolist())
    model.generation_config.eos_token_id = eos
    rows = [tok.encode("hello"), tok.encode("The end")]
    width = max(map(len, rows))
    ids = torch.tensor([[1] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = dm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, stop_at_eos=True, **GREEDY)
    assert out.ids.shape == (2, 6)
    stop = a.tolist().index(eos) + 1
    assert out.lengths.tolist() == [stop, 6]
    assert torch.all(out.ids[0, stop:] == dm.pad_token_id)
    assert torch.all(out.y[0, stop:] == 0)
    assert torch.equal(out.ids[1], b)


def test_forward_loss_matches_manual(tiny_lm):
    model, tok = tiny_lm
    dm = STGSDiffModel(model, tok)
    ids = torch.tensor([tok.encode("hello world, hello model")])
    labels = ids.clone()
    labels[:, :3] = -100
    out = dm(input_ids=ids, labels=labels)
    logits = model(input_ids=ids).logits
    manual = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    assert torch.allclose(out.loss, manual, atol=1e-5)
    kept = dm(input_ids=ids, labels=labels, logits_to_keep=5)
    assert kept.logits.shape[1] == 5
    assert torch.allclose(kept.logits, out.logits[:, -5:], atol=1e-5)


def test_kept_logits_in_bfloat16_are_last_positions(tiny_lm):
    model, tok = tiny_lm
    dm = STGSDiffModel(model.to(torch.bfloat16), tok)
    ids = torch.tensor([tok.encode("hello world, hello model")])

    full = dm(input_ids=ids).logits
    last_five = dm(input_ids=ids, logits_to_keep=5).logits

    assert last_five.shape[1] == 5
    assert torch.allclose(last_five, full[:, -5:], atol=1e-2)


def test_parts_broadcast_and_mixed_inputs(tiny_lm):
    model, tok = tiny_lm
    dm = STGSDiffModel(model, tok)
    one_hot = torch.nn.functional.one_hot(torch.tensor([[3, 4], [5, 6], [7, 8]]), dm.vocab_size).float()
    embeds = dm.embed("x").expand(3, -1, -1)
    out = dm(parts=["hello", one_hot, dm.encode(" fox"), embeds])
    assert out.logits.shape[:2] == (3, len(tok.encode("hello")) + 2 + len(tok.encode(" fox")) + 1)
    with pytest.raises(ValueError, match="batch"):
        dm(parts=[one_hot, one_hot[:2]])
    with pytest.raises(ValueError, match="width"):
        dm(parts=[torch.zeros(1, 2, 5)])


def test_one_hot_lookup_matches_matmul():
    from sdlm.stgs import STGS
    from sdlm.stgs_diff_model import embed_token_vectors

    weight = torch.randn(50, 8, requires_grad=True)
    logits = torch.randn(3, 4, 50, requires_grad=True)
    grads = []
    for use_lookup in (True, False):
        y = STGS()(logits, generator=torch.Generator().manual_seed(0)).y
        embeds = embed_token_vectors(y, weight) if use_lookup else y @ weight
        embeds.pow(2).sum().backward()
        grads.append((embeds.detach(), logits.grad.clone(), weight.grad.clone()))
        logits.grad, weight.grad = None, None
    (lookup, lookup_logit_grad, lookup_weight_grad), (product, logit_grad, weight_grad) = grads
    assert torch.equal(lookup, product)
    assert torch.allclose(lookup_logit_grad, logit_grad)
    assert torch.allclose(lookup_weight_grad, weight_grad)


def test_soft_vectors_take_the_matmul():
    from sdlm.stgs_diff_model import embed_token_vectors, is_one_hot

    weight = torch.randn(10, 4)
    soft = torch.softmax(torch.randn(2, 3, 10), dim=-1)
    assert not is_one_hot(soft)
    assert torch.allclose(embed_token_vectors(soft, weight), soft @ weight)


def test_prefix_cache_matches_full_forward(tiny_lm):
    model, tokenizer = tiny_lm
    dm = STGSDiffModel(model, tokenizer)
    generator = torch.Generator().manual_seed(0)
    prefix_ids = torch.randint(0, len(tokenizer), (1, 6), generator=generator)
    target_ids = torch.randint(0, len(tokenizer), (1, 4), generator=generator)
    ids = torch.randint(0, len(tokenizer), (3, 5), generator=generator)
    prompt = F.one_hot(ids, dm.vocab_size).float().requires_grad_(True)  # (3, 5, V)
    cached_prompt = prompt.detach().clone().requires_grad_(True)

    full = dm(parts=[prefix_ids, prompt, target_ids], logits_to_keep=5)
    cached = dm(parts=[cached_prompt, target_ids], prefix=dm.cache_prefix(prefix_ids), logits_to_keep=5)
    full.logits.square().sum().backward()
    cached.logits.square().sum().backward()

    assert cached.logits.shape == (3, 5, dm.vocab_size)
    torch.testing.assert_close(cached.logits, full.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached_prompt.grad, prompt.grad, atol=1e-4, rtol=1e-4)


def test_prefix_cache_reused_across_calls(tiny_lm):
    model, tokenizer = tiny_lm
    dm = STGSDiffModel(model, tokenizer)
    prefix = dm.cache_prefix(torch.tensor([[5, 6, 7]]))
    ids = torch.tensor([[8, 9, 10, 11]])

    first = dm(parts=[ids], prefix=prefix).logits
    second = dm(parts=[ids.expand(2, -1)], prefix=prefix).logits

    assert prefix.cache.get_seq_length() == 3  # the calls worked on copies
    torch.testing.assert_close(second[0], first[0])
    torch.testing.assert_close(second[1], first[0])


def test_prefix_cache_with_mask_and_labels(tiny_lm):
    model, tokenizer = tiny_lm
    dm = STGSDiffModel(model, tokenizer)
    prefix_ids = torch.tensor([[5, 6, 7]])
    ids = torch.tensor([[0, 8, 9, 10], [11, 12, 13, 14]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # row 0 has one padding token
    labels = torch.tensor([[-100, -100, 9, 10], [-100, 12, 13, 14]])

    full = dm(parts=[prefix_ids, ids], attention_mask=torch.cat([torch.ones(2, 3, dtype=torch.long), mask], 1),
              labels=torch.cat([torch.full((2, 3), -100), labels], 1))
    cached = dm(parts=[ids], prefix=dm.cache_prefix(prefix_ids), attention_mask=mask, labels=labels, use_cache=True)

    torch.testing.assert_close(cached.logits[1], full.logits[1, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached.logits[0, 1:], full.logits[0, 4:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached.loss, full.loss, atol=1e-5, rtol=1e-5)
    assert cached.past_key_values.get_seq_length() == 7


def test_no_prefix_cache_without_dynamic_cache(tiny_lm, monkeypatch):
    model, tokenizer = tiny_lm
    dm = STGSDiffModel(model, tokenizer)
    monkeypatch.setattr(dm, "_cache_of", lambda out: None)

    assert dm.cache_prefix(torch.tensor([[5, 6, 7]])) is None


def test_empty_prefix_gives_no_cache(tiny_lm):
    model, tokenizer = tiny_lm
    dm = STGSDiffModel(model, tokenizer)

    assert dm.cache_prefix(torch.zeros(1, 0, dtype=torch.long)) is None
