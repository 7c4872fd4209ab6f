"""Keyword term: the free-running output after the prompt must contain some words and avoid others.

Shapes: `S` Gumbel samples, `N` generated tokens, `K` token variants of one word, `V` vocabulary.

The loss looks only at each word's first token, in the spellings the word can start with. These
are with and without a leading space, and in other cases unless matching is case-sensitive.
  required word: -log of the expected number of positions that emit one of its first tokens,
                 -log sum_t sum_k p_t(k), floored at 0 so a word already likely costs nothing;
  avoided word:  sum_t -log(1 - sum_k p_t(k)), which grows as any position leans towards it.
The check runs plain greedy generation and matches whole words and phrases as substrings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdlm.objectives import CheckResult, LossOutput, greedy_generate
from sdlm.stgs_diff_model import STGSDiffModel


def word_spellings(word: str, case_sensitive: bool) -> list[str]:
    """List the texts a word may appear as in generated text, before its first token is taken."""
    forms = [word] if case_sensitive else list(dict.fromkeys([word, word.lower(), word.capitalize(), word.upper()]))
    return [prefix + form for form in forms for prefix in ("", " ")]


def first_token_ids(tokenizer, word: str, case_sensitive: bool) -> list[int]:
    """Return the distinct first token ids of the word's spellings."""
    ids = []
    for text in word_spellings(word, case_sensitive):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if encoded and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


def find_words(text: str, words: list[str], case_sensitive: bool) -> list[bool]:
    """Return whether each word occurs in text as a substring."""
    if not case_sensitive:
        text, words = text.casefold(), [w.casefold() for w in words]
    return [w in text for w in words]


class KeywordsTerm:
    """Make the output after [prefix][prompt][suffix] contain every required word and no avoided one.

    max_new_tokens tokens are generated in the loss (through STGSDiffModel.generate) and in the
    check (greedy). Success: all required words found and no avoided word found.
    """

    name = "keywords"
    primary = True

    def __init__(
        self,
        model: STGSDiffModel,
        *,
        require: list[str] = (),
        avoid: list[str] = (),
        prefix: str = "",
        suffix: str = "",
        max_new_tokens: int = 16,
        case_sensitive: bool = False,
    ) -> None:
        if not require and not avoid:
            raise ValueError("give at least one word to require or avoid")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model
        self.require, self.avoid = list(require), list(avoid)
        self.prefix, self.suffix = prefix, suffix
        self.prefix_ids = model.encode(prefix)  # (1, P)
        self.suffix_ids = model.encode(suffix)  # (1, Q)
        self.max_new_tokens = max_new_tokens
        self.case_sensitive = case_sensitive
        tokenizer = model.tokenizer
        self.require_ids = [first_token_ids(tokenizer, w, case_sensitive) for w in self.require]
        self.avoid_ids = [first_token_ids(tokenizer, w, case_sensitive) for w in self.avoid]

    def loss(self, prompt_y: torch.Tensor) -> LossOutput:
        out = self.model.generate(parts=[self.prefix_ids, prompt_y, self.suffix_ids], max_new_tokens=self.max_new_tokens)
        probs = F.softmax(out.logits, dim=-1)  # (S, N, V)
        losses = []
        for ids in self.require_ids:
            # Expected count of positions that start the word, summed over its spellings.
            count = probs[:, :, ids].sum((1, 2))  # (S,)
            losses.append(F.relu(-torch.log(count.clamp_min(1e-12))))
        for ids in self.avoid_ids:
            p_word = probs[:, :, ids].sum(-1).clamp_max(1 - 1e-6)  # (S, N)
            losses.append(-torch.log1p(-p_word).sum(-1))
        per_sample = torch.stack(losses, dim=-1).mean(-1)  # (S,)
        # A sample whose own generated text already passes is worth a greedy check.
        solved = torch.tensor([self._passes(text)[0] for text in out.text], device=per_sample.device)
        return LossOutput(per_sample=per_sample, solved=solved)

    def _passes(self, text: str) -> tuple[bool, int, int]:
        """(success, required words found, avoided words found) for an output text."""
        found = sum(find_words(text, self.require, self.case_sensitive))
        bad = sum(find_words(text, self.avoid, self.case_sensitive))
        return found == len(self.require) and bad == 0, found, bad

    @torch.no_grad()
    def check(self, prompt_ids: list[int]) -> CheckResult:
        """Greedy-generate from the prompt ids and from the decoded text re-encoded; match the words."""
        tokenizer = self.model.tokenizer
        ids = self.prefix_ids[0].tolist() + list(prompt_ids) + self.suffix_ids[0].tolist()
        output = greedy_generate(self.model, ids, self.max_new_tokens)
        output_text = tokenizer.decode(output, clean_up_tokenization_spaces=False)
        success, found, bad = self._passes(output_text)

        prompt_text = tokenizer.decode(list(prompt_ids), clean_up_tokenization_spaces=False)
        text_ids = tokenizer.encode(self.prefix + prompt_text + self.suffix, add_special_tokens=False)
        text_ids_same = text_ids == ids
        if text_ids_same:
            text_success = success
        else:
            text_output = greedy_generate(self.model, text_ids, self.max_new_tokens)
            text_success = self._passes(tokenizer.decode(text_output, clean_up_tokenization_spaces=False))[0]
        conditions = len(self.require) + len(self.avoid)
        score = (found + len(self.avoid) - bad) / conditions
        return CheckResult(
            success=success, prompt_ids=list(prompt_ids), prompt_text=prompt_text, output_ids=output,
            output_text=output_text, token_accuracy=score, lcs_ratio=score, text_ids_same=text_ids_same,
            text_success=text_success, metrics={"required_found": float(found), "avoided_found": float(bad)},
        )
