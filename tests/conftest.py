"""Shared fixtures: a tiny byte-level BPE tokenizer and tiny random models built offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Tiny models run fastest on one thread, and a shared 2-core machine thrashes with more.
torch.set_num_threads(1)

# Inversion targets for the embedded model: the shared data folder beside the repository when it
# is there, else the few samples copied into tests/data.
_SHARED = Path(os.environ.get("SDLM_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
SHARED_DATA = _SHARED if (_SHARED / "lmi_smollm2_instruct_pl10_tl10.json").is_file() else Path(__file__).parent / "data"

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A prompt is a distribution over the vocabulary at each position.",
    "Gradient descent through Gumbel samples finds prompts.\n\nThe end.",
    "hello world, hello model, 12345 67890!",
] * 20


def build_tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on a fixed corpus: deterministic, offline, a few ms."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


def build_tiny_model(arch: str, vocab_size: int, tie: bool = True, seed: int = 0):
    """A 2-layer random causal LM: "llama" (rotary positions) or "gpt2" (learned positions)."""
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, pad_token_id=1,
        )
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128,
            tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, pad_token_id=1,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(arch)
    return model.eval()


# (architecture, tied embeddings, extra embedding rows beyond the tokenizer)
TINY_CASES = [("llama", True, 0), ("llama", False, 13), ("gpt2", True, 0), ("gpt2", False, 7)]
TINY_IDS = [f"{a}-{'tied' if t else 'untied'}-{'padded' if e else 'exact'}" for a, t, e in TINY_CASES]


@pytest.fixture(params=TINY_CASES, ids=TINY_IDS)
def tiny_lm(request, tiny_tokenizer):
    arch, tie, extra = request.param
    model = build_tiny_model(arch, len(tiny_tokenizer) + extra, tie=tie)
    return model, tiny_tokenizer
