"""Discrete polish: a small gradient-guided search over single-token swaps of one prompt.

The relaxed search often stalls one or two tokens short of a prompt that works, with logits
so saturated that the Gumbel noise no longer changes the sample. The polish works on hard
token ids instead. It walks a track of prompts from a start prompt and, on each call:

1. takes the gradient of the target loss through the one-hot vectors of its track prompt,
   over the target tokens up to and including the first one that greedy decoding gets wrong;
2. draws `width` single-token swaps, each at a random position, to one of the `topk` tokens
   whose gradient promises the largest decrease there;
3. scores every swap in one batched teacher-forced forward pass and moves the track to the
   best one, even when it is worse than the track prompt, as GCG moves to its best candidate.
   A track that only accepted improvements stalled where no single swap helps. The incumbent
   is the best prompt the track has reached. With a tokenizer, and a track prompt whose text
   encodes back to the same ids, swaps whose text does not are dropped first, so a swap that
   works as ids also works as pasted text, unless the fixed text around the prompt merges with it.

Prompts are ranked by `matched`, the number of leading target tokens that greedy decoding
reproduces, then by the mean target loss. Under teacher forcing, the argmax at target
position t equals the greedy token whenever every earlier token was right. So `matched` is
the prefix length of the greedy check, computed for a whole batch in one pass. The loop
still confirms a full match with real greedy generation before it reports success.

Shapes: `B` candidate prompts, `L` prompt length, `T` target length, `V` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from sdlm.objectives import TargetObjective, token_losses


@dataclass(frozen=True)
class Scored:
    """One discrete prompt and its teacher-forced score on the target."""

    ids: tuple[int, ...]
    matched: int  # leading target tokens that greedy decoding reproduces
    loss: float  # mean target token loss

    @property
    def key(self) -> tuple[int, float]:
        # Greater is better.
        return (self.matched, -self.loss)


def matched_prefix(hits: torch.Tensor) -> torch.Tensor:
    """Count the leading True values of each row of hits (B, T); returns (B,)."""
    return hits.long().cumprod(-1).sum(-1)


@torch.no_grad()
def score_prompts(objective: TargetObjective, prompt_ids: torch.Tensor, chunk: int = 64) -> list[Scored]:
    """Score prompt_ids (B, L) on the target by teacher forcing, `chunk` prompts per forward pass."""
    scored: list[Scored] = []
    for rows in prompt_ids.split(chunk):
        logits = objective.teacher_forced_logits(rows)  # (b, T, V)
        targets = objective.target_ids.expand(rows.shape[0], -1)  # (b, T)
        losses = token_losses(logits, targets, objective.loss_type, objective.margin).mean(-1)  # (b,)
        matched = matched_prefix(logits.argmax(-1) == targets)  # (b,)
        scored += [Scored(tuple(r), m, l) for r, m, l in zip(rows.tolist(), matched.tolist(), losses.tolist())]
    return scored


def swap_candidates(
    objective: TargetObjective,
    prompt: Scored,
    allowed: torch.Tensor,
    *,
    width: int,
    topk: int,
    generator: torch.Generator | None = None,
    tokenizer=None,
) -> torch.Tensor:
    """Draw `width` single-token swaps (B, L) of `prompt`, ranked by the one-hot gradient.

    allowed: (V,) or (L, V) bool of the tokens each position may use. tokenizer: when given,
    and the prompt's decoded text encodes back to its ids, keep only the swaps for which
    the same holds.
    """
    model = objective.model
    ids = torch.tensor(prompt.ids, device=model.device)  # (L,)
    L, V = ids.numel(), model.vocab_size
    one_hot = F.one_hot(ids, V).to(model.dtype).unsqueeze(0).requires_grad_(True)  # (1, L, V)
    with torch.enable_grad():
        logits = objective.teacher_forced_logits(one_hot)  # (1, T, V)
        # The loss covers the target tokens up to the first wrong one, so the swaps aim to fix
        # that token while keeping the earlier ones right.
        scored_length = min(prompt.matched + 1, objective.target_length)
        losses = token_losses(
            logits[:, :scored_length], objective.target_ids[:, :scored_length], objective.loss_type, objective.margin
        )
        (grad,) = torch.autograd.grad(losses.mean(), one_hot)
    grad = grad[0].float()  # (L, V)
    grad = grad.masked_fill(~allowed.to(grad.device).expand(L, V), float("inf"))
    grad[torch.arange(L), ids] = float("inf")  # A swap must change the token.
    k = min(topk, V)
    top = (-grad).topk(k, dim=-1).indices  # (L, k)
    usable = torch.isfinite(grad.gather(-1, top))  # (L, k): False where fewer than k tokens are allowed
    # The draws use the generator's device, and the swaps the model's.
    draw_device = generator.device if generator is not None else None
    positions = torch.randint(L, (width,), generator=generator, device=draw_device).to(ids.device)
    choices = torch.randint(k, (width,), generator=generator, device=draw_device).to(ids.device)
    keep = usable[positions, choices]
    positions, choices = positions[keep], choices[keep]
    candidates = ids.repeat(positions.numel(), 1)  # (B, L)
    candidates[torch.arange(positions.numel(), device=ids.device), positions] = top[positions, choices]
    candidates = torch.unique(candidates, dim=0)
    # The filter applies only to a prompt that re-encodes to itself. For one that does not,
    # the only stable swaps are those that repair its joins, too few to search with.
    if tokenizer is not None and reencodes(tokenizer, prompt.ids):
        stable = torch.tensor([reencodes(tokenizer, row) for row in candidates.tolist()], dtype=torch.bool)
        candidates = candidates[stable.to(candidates.device)]
    return candidates


def reencodes(tokenizer, ids: Sequence[int]) -> bool:
    """Return whether the decoded text of ids encodes back to the same ids."""
    text = tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)
    return tokenizer.encode(text, add_special_tokens=False) == list(ids)


def join_repairs(
    tokenizer, ids: Sequence[int], scores: torch.Tensor, allowed: torch.Tensor, *, per_position: int = 4
) -> torch.Tensor:
    """Return single-token changes (B, L) of ids whose decoded text encodes back to themselves.

    For a prompt whose ids work but whose text splits into other tokens when encoded again:
    two tokens that merge at their join, or a token that the tokenizer spells differently.
    Each position from the first to the last one that the new encoding changes gets its
    `per_position` best other tokens by scores (L, V), such as the relaxed prompt's logits,
    among those that allowed (V,) or (L, V) permits. A prompt with two separate changed spans
    gets no candidates that pass, because one change mends one span.
    """
    ids = list(ids)
    length = len(ids)
    text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    encoded = tokenizer.encode(text, add_special_tokens=False)
    if encoded == ids:
        return torch.empty(0, length, dtype=torch.long)
    # The changed span [first, last) of ids lies between the start and the end that ids and
    # encoded share.
    first = 0
    while first < min(length, len(encoded)) and ids[first] == encoded[first]:
        first += 1
    tail = 0
    while tail < min(length, len(encoded)) - first and ids[-1 - tail] == encoded[-1 - tail]:
        tail += 1
    last = max(length - tail, first + 1)
    positions = torch.arange(first, last)
    span_scores = scores.detach()[positions].float().clone()  # (N, V)
    span_scores = span_scores.masked_fill(~allowed.to(span_scores.device).expand(length, -1)[positions], float("-inf"))
    current = torch.tensor(ids)[positions]  # (N,) tokens in place, excluded because they change nothing
    span_scores[torch.arange(positions.numel()), current] = float("-inf")
    top = span_scores.topk(min(per_position, span_scores.shape[-1]), dim=-1)  # (N, k)
    candidates = []
    for row, position in enumerate(positions.tolist()):
        for value, token in zip(top.values[row].tolist(), top.indices[row].tolist()):
            if value == float("-inf"):
                break
            candidate = ids[:position] + [token] + ids[position + 1 :]
            if reencodes(tokenizer, candidate):
                candidates.append(candidate)
    return torch.tensor(candidates, dtype=torch.long).view(-1, length)


def permitted(allowed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Return (L,) bool: whether allowed (V,) or (L, V) permits each of ids (L,) at its position."""
    length = ids.numel()
    positions = torch.arange(length, device=ids.device)
    return allowed.to(ids.device).expand(length, -1)[positions, ids]


def target_copy(target_ids: torch.Tensor, fallback: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Return a prompt (L,) made of the target's first tokens, for a polish that starts there.

    target_ids: (T,). fallback: (L,) ids for the positions past the target's end and for
    target tokens that allowed (V,) or (L, V) does not permit there. Language models tend to
    repeat text from their input, so this prompt often gets most target tokens right already.
    """
    length = fallback.numel()
    ids = fallback.clone()  # (L,)
    count = min(length, target_ids.numel())
    ids[:count] = target_ids[:count].to(ids.device)
    return torch.where(permitted(allowed, ids), ids, fallback)


class Polisher:
    """Search discrete prompts by gradient-ranked single-token swaps, and keep the best one.

    offer(): propose prompts from the relaxed search; the best becomes the incumbent, and the
    track's prompt, when it beats the incumbent. polish(): one round of swaps from the track's
    prompt, which moves to the round's best swap. Both return the incumbent.
    """

    def __init__(
        self,
        objective: TargetObjective,
        allowed: torch.Tensor,
        *,
        width: int = 32,
        topk: int = 16,
        generator: torch.Generator | None = None,
        tokenizer=None,
    ) -> None:
        if width < 1 or topk < 1:
            raise ValueError(f"width and topk must be >= 1, got {width} and {topk}")
        self.objective = objective
        self.allowed = allowed
        self.width, self.topk = width, topk
        self.generator = generator
        self.tokenizer = tokenizer  # when set, swaps must survive decode -> re-encode (see swap_candidates)
        self.incumbent: Scored | None = None  # the best prompt so far
        self.track: Scored | None = None  # the prompt the next round swaps from

    @property
    def solved(self) -> bool:
        return self.incumbent is not None and self.incumbent.matched == self.objective.target_length

    def _take(self, scored: list[Scored]) -> Scored:
        best = max(scored, key=lambda s: s.key)
        if self.incumbent is None or best.key > self.incumbent.key:
            self.incumbent = self.track = best
        return self.incumbent

    def offer(self, prompt_ids: torch.Tensor) -> Scored:
        """Score prompt_ids (B, L) and keep the best of them and the incumbent."""
        return self._take(score_prompts(self.objective, prompt_ids))

    def polish(self) -> Scored:
        """Try one round of swaps from the track's prompt (offer() first); move the track to the best.

        Returns the incumbent, which changes only when the track's new prompt beats it.
        """
        if self.incumbent is None:
            raise ValueError("offer() a prompt before polish()")
        if self.solved:
            return self.incumbent
        track = self.track or self.incumbent
        candidates = swap_candidates(
            self.objective, track, self.allowed, width=self.width, topk=self.topk, generator=self.generator,
            tokenizer=self.tokenizer,
        )
        if candidates.numel() == 0:
            return self.incumbent
        self.track = max(score_prompts(self.objective, candidates), key=lambda s: s.key)
        return self._take([self.track])
