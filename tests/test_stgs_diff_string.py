import pytest
import torch

from sdlm import STGS, STGSDiffString
from sdlm.stgs_diff_string import build_vocab_mask


def test_init_from_text_decodes_back(tiny_tokenizer):
    s = STGSDiffString(tiny_tokenizer, init_text="hello world")
    assert s.length == len(tiny_tokenizer.encode("hello world"))
    assert s.logits.shape == (1, s.length, len(tiny_tokenizer))
    assert s.text == "hello world"


def test_init_from_ids_and_random(tiny_tokenizer):
    s = STGSDiffString(tiny_tokenizer, init_ids=[5, 6, 7], init_scale=3.0)
    assert s.ids.tolist() == [5, 6, 7]
    assert s.logits[0, 0, 5] == 3.0
    r = STGSDiffString(tiny_tokenizer, length=6, init_scale=0.5, generator=torch.Generator().manual_seed(0))
    assert r.length == 6
    assert 0.4 < r.logits.std() < 0.6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"length": 3, "init_text": "x"}, "exactly one"),
        ({"length": 0}, "length"),
        ({"init_text": ""}, "init_text"),
        ({"length": 2, "init_scale": 0}, "init_scale"),
        ({"init_ids": [10**6]}, "init_ids"),
    ],
)
def test_bad_init_rejected(tiny_tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        STGSDiffString(tiny_tokenizer, **kwargs)


def test_sample_shapes_and_mask(tiny_tokenizer):
    s = STGSDiffString(tiny_tokenizer, length=4, vocab_size=len(tiny_tokenizer) + 10, vocab_mask="no_special")
    draw = s.sample(64, generator=torch.Generator().manual_seed(0))
    assert draw.y.shape == (64, 4, len(tiny_tokenizer) + 10)
    assert draw.ids.shape == (64, 4)
    banned = set(tiny_tokenizer.all_special_ids) | set(range(len(tiny_tokenizer), len(tiny_tokenizer) + 10))
    assert not banned & set(draw.ids.unique().tolist())
    assert len(s.decode(draw.ids)) == 64


def test_ids_respect_mask(tiny_tokenizer):
    s = STGSDiffString(tiny_tokenizer, init_ids=[0, 5], vocab_mask="no_special")
    assert s.ids[0].item() != 0  # token 0 is special, so the best allowed one wins
    assert s.ids[1].item() == 5


def test_vocab_masks(tiny_tokenizer):
    V = len(tiny_tokenizer) + 3
    none = build_vocab_mask(tiny_tokenizer, "none", V)
    assert none[: len(tiny_tokenizer)].all()
    assert not none[len(tiny_tokenizer):].any()
    no_special = build_vocab_mask(tiny_tokenizer, "no_special", V)
    assert not no_special[tiny_tokenizer.all_special_ids].any()
    ascii_mask = build_vocab_mask(tiny_tokenizer, "ascii", V)
    for i in ascii_mask.nonzero().view(-1).tolist():
        assert tiny_tokenizer.decode([i]).isascii()
    roundtrip = build_vocab_mask(tiny_tokenizer, "roundtrip", V)
    for i in roundtrip.nonzero().view(-1).tolist():
        assert tiny_tokenizer.encode(tiny_tokenizer.decode([i])) == [i]
    listed = build_vocab_mask(tiny_tokenizer, [5, 9], V)
    assert listed.nonzero().view(-1).tolist() == [5, 9]
    with pytest.raises(ValueError, match="vocab_mask"):
        build_vocab_mask(tiny_tokenizer, "emoji", V)


def test_length_changes_keep_untouched_logits(tiny_tokenizer):
    s = STGSDiffString(tiny_tokenizer, length=5, generator=torch.Generator().manual_seed(0))
    original = s.logits.detach().clone()
    s.insert(2, 3)
    assert s.length == 8
    assert torch.equal(s.logits[:, :2], original[:, :2])
    assert torch.equal(s.logits[:, 5:], original[:, 2:])
    s.delete(2, 3)
    assert torch.equal(s.logits, original)
    s.insert(0, text="hello")
    assert s.text.startswith("hello")
    s.resize(3)
    assert s.length == 3
    s.resize(7)
    assert s.length == 7
    with pytest.raises(ValueError):
        s.delete(0, 7)
    with pytest.raises(ValueError):
        s.insert(99)


@pytest.mark.parametrize("mode", ["none", "scalar", "per_position"])
def test_save_load_round_trip(tiny_tokenizer, tmp_path, mode):
    stgs = STGS(temperature=0.7, learnable_temperature=mode, length=4, min_temperature=0.1, max_temperature=2.0, normalize="zscore")
    s = STGSDiffString(tiny_tokenizer, length=4, stgs=stgs, vocab_mask="ascii")
    with torch.no_grad():
        s.logits.add_(torch.randn_like(s.logits))
        if mode != "none":
            stgs.temperature_raw.add_(0.3)
    s.save(tmp_path / "prompt.safetensors")
    loaded = STGSDiffString.load(tmp_path / "prompt.safetensors", tiny_tokenizer)
    assert torch.equal(loaded.logits, s.logits)
    assert torch.equal(loaded.vocab_mask, s.vocab_mask)
    assert loaded.text == s.text
    assert loaded.stgs.normalize == "zscore"
    assert torch.equal(loaded.stgs.temperature(), s.stgs.temperature())
    a = s.sample(3, generator=torch.Generator().manual_seed(1))
    b = loaded.sample(3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.ids, b.ids)


def test_decode_keeps_spaces(tiny_tokenizer):
    ids = tiny_tokenizer.encode("  hello ,world")
    s = STGSDiffString(tiny_tokenizer, init_ids=ids)
    assert s.text == "  hello ,world"


def test_saved_string_omits_embedding_matrix(tiny_tokenizer, tmp_path):
    weight = torch.nn.Parameter(torch.randn(len(tiny_tokenizer), 8), requires_grad=False)
    stgs = STGS(hard_method="nearest", embedding_weight=weight)
    s = STGSDiffString(tiny_tokenizer, length=3, stgs=stgs)
    assert [name for name, _ in s.named_parameters()] == ["logits"]
    s.save(tmp_path / "p.safetensors")
    from safetensors.torch import load_file

    assert sorted(load_file(str(tmp_path / "p.safetensors"))) == ["logits", "stgs.initial_temperature", "vocab_mask"]
