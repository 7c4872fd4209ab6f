"""Per-position constraints of the prompt: a fixed text, a token list or a character class.

Each constraint is a mapping with `position` and one of `text`, `tokens` or `chars`, as
`prompt.constraints` in the config gives them. `position_mask` turns them into an (L, V) bool
mask for STGSDiffString.constrain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sdlm.stgs_diff_string import _decoded_tokens

_CHAR_TESTS = {
    "alpha": str.isalpha,
    "digit": str.isdigit,
    "alnum": str.isalnum,
    "upper": lambda text: text.isalpha() and text.isupper(),
    "lower": lambda text: text.isalpha() and text.islower(),
    "space": str.isspace,
    "ascii": lambda text: text.isascii() and text.isprintable(),
}


def char_class_mask(tokenizer, vocab_size: int, chars: str) -> torch.Tensor:
    """Return a (V,) bool mask of tokens whose text, less one leading space, is non-empty and all of class `chars`."""
    if chars not in _CHAR_TESTS:
        raise ValueError(f"chars must be one of {', '.join(_CHAR_TESTS)}, got {chars!r}")
    test = _CHAR_TESTS[chars]
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    for token_id, text in enumerate(_decoded_tokens(tokenizer, min(len(tokenizer), vocab_size))):
        core = text if chars == "space" else text.removeprefix(" ")
        mask[token_id] = bool(core) and test(core)
    return mask


def position_mask(tokenizer, length: int, vocab_size: int, constraints: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """Build the (L, V) bool mask of the constraints; unconstrained positions allow every token.

    Raises ValueError, naming prompt.constraints[i], for a position past the prompt's end, a
    token text that is not one token, or two constraints on one position.
    """
    mask = torch.ones(length, vocab_size, dtype=torch.bool)
    claimed: dict[int, int] = {}
    for index, constraint in enumerate(constraints):
        key = f"prompt.constraints[{index}]"
        start = int(constraint["position"])
        if "text" in constraint:
            ids = tokenizer.encode(constraint["text"], add_special_tokens=False)
            rows = [(start + offset, [token_id]) for offset, token_id in enumerate(ids)]
        elif "tokens" in constraint:
            allowed = []
            for text in constraint["tokens"]:
                ids = tokenizer.encode(text, add_special_tokens=False)
                if len(ids) != 1:
                    raise ValueError(f"{key}.tokens: {text!r} encodes to {len(ids)} tokens, expected 1 (list single tokens)")
                allowed.append(ids[0])
            rows = [(start, allowed)]
        else:
            rows = [(start, char_class_mask(tokenizer, vocab_size, constraint["chars"]).nonzero().view(-1).tolist())]
        for position, allowed in rows:
            if position >= length:
                raise ValueError(f"{key}: position {position} is past the prompt's last position {length - 1} (lengthen the prompt)")
            if position in claimed:
                raise ValueError(f"{key}: position {position} is already constrained by prompt.constraints[{claimed[position]}]")
            claimed[position] = index
            mask[position] = False
            mask[position, torch.as_tensor(allowed, dtype=torch.long)] = True
    return mask
