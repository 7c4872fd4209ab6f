"""Objectives: a differentiable loss on sampled prompts and a success check on a discrete prompt.

Shapes: `S` Gumbel samples, `L` prompt length, `T` target length, `V` vocabulary.

The loss scores STGS samples of the prompt. The check takes one prompt as token ids and runs the
model's ordinary greedy generation, so a reported success is real, never inferred from the loss.
A target check reads the greedy tokens from one forward pass where it can (see greedy_generate).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from sdlm.metrics import exact_match, lcs_ratio, token_accuracy
from sdlm.stgs_diff_model import PrefixCache, STGSDiffModel

logger = logging.getLogger("sdlm")

TargetMode = Literal["teacher_forcing", "generation"]
TokenLoss = Literal["cross_entropy", "margin"]


@dataclass
class LossOutput:
    """per_sample: (S,) loss of each sample; solved: (S,) bool, True where the sample's
    teacher-forced argmax already equals the target at every position (a cheap hint that the
    sample may pass the check), or None; accuracy: (S,) teacher-forced token accuracy, or None.
    terms: each term's unweighted (S,) loss, detached, for a composite objective."""

    per_sample: torch.Tensor
    solved: torch.Tensor | None = None
    accuracy: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class CheckResult:
    """The discrete check of one prompt.

    success: greedy generation from the prompt ids reproduces the target exactly (for a
    composite objective: every term's check passes).
    token_accuracy, lcs_ratio: closeness of the output to the target, in [0, 1]; terms without
    a target report their own score in [0, 1] as token_accuracy.
    text_ids_same: decode -> re-encode of the whole input gives the same ids back.
    text_success: the check passes on the re-encoded text too (what a user who pastes it gets).
    metrics: extra numbers, such as "prompt_perplexity" and "<term>.<name>" of each term.
    terms: term name -> whether that term's check passed.
    """

    success: bool
    prompt_ids: list[int]
    prompt_text: str
    output_ids: list[int]
    output_text: str
    token_accuracy: float
    lcs_ratio: float
    text_ids_same: bool
    text_success: bool
    metrics: dict[str, float] = field(default_factory=dict)
    terms: dict[str, bool] = field(default_factory=dict)

    def meets(self, require_text: bool) -> bool:
        """Return whether this check ends a run as a success: the ids pass, and the text too when required."""
        return self.success and (self.text_success or not require_text)


def token_losses(logits: torch.Tensor, targets: torch.Tensor, loss: TokenLoss = "cross_entropy", margin: float = 1.0) -> torch.Tensor:
    """Loss (N, T) of each target token given its logits (N, T, V) and ids (N, T).

    cross_entropy: -log softmax(logits)[target]. margin: the hinge
    max(0, margin - (logit[target] - max over other tokens of logit)), which is 0 once the
    target beats every other token by `margin`, so the greedy argmax is the target.
    """
    N, T, V = logits.shape
    if loss == "cross_entropy":
        return F.cross_entropy(logits.reshape(N * T, V), targets.reshape(-1), reduction="none").view(N, T)
    if loss == "margin":
        target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N, T)
        others = logits.scatter(-1, targets.unsqueeze(-1), float("-inf"))
        return F.relu(margin - (target_logits - others.max(-1).values))
    raise ValueError(f"loss must be cross_entropy or margin, got {loss!r}")


class TargetObjective:
    """Make the model continue [prefix][prompt][suffix] with exactly the target tokens.

    mode "teacher_forcing" scores the target tokens given the sampled prompt in one forward
    pass; mode "generation" generates T tokens free-running through STGS and scores each
    generated position against the target. loss "cross_entropy" or "margin" (see token_losses).
    """

    name = "target"
    primary = True

    def __init__(
        self,
        model: STGSDiffModel,
        target_ids: list[int],
        *,
        prefix: str = "",
        suffix: str = "",
        mode: TargetMode = "teacher_forcing",
        loss: TokenLoss = "cross_entropy",
        margin: float = 1.0,
    ) -> None:
        if not target_ids:
            raise ValueError("the target is empty: give a non-empty target text or target_ids")
        if mode not in ("teacher_forcing", "generation"):
            raise ValueError(f"mode must be teacher_forcing or generation, got {mode!r}")
        if loss not in ("cross_entropy", "margin"):
            raise ValueError(f"loss must be cross_entropy or margin, got {loss!r}")
        self.model = model
        self.loss_type, self.margin = loss, float(margin)
        self.mode = mode
        self.prefix, self.suffix = prefix, suffix
        self.prefix_ids = model.encode(prefix)  # (1, P)
        self.suffix_ids = model.encode(suffix)  # (1, Q)
        self.target_ids = torch.tensor([target_ids], dtype=torch.long, device=model.device)  # (1, T)
        self.target_text = model.tokenizer.decode(target_ids, clean_up_tokenization_spaces=False)

    @classmethod
    def from_text(cls, model: STGSDiffModel, target: str, **kwargs) -> "TargetObjective":
        """Build from target text, encoded alone with no special tokens."""
        target_ids = model.tokenizer.encode(target, add_special_tokens=False)
        suffix = kwargs.get("suffix", "")
        if suffix:
            # Tokens can merge across the join; the optimizer uses the target's own ids.
            joined = model.tokenizer.encode(suffix + target, add_special_tokens=False)
            apart = model.tokenizer.encode(suffix, add_special_tokens=False) + target_ids
            if joined != apart:
                logger.warning(
                    "suffix %r and target %r tokenize differently together than apart; "
                    "the target ids %s are used as given",
                    suffix, target, target_ids,
                )
        return cls(model, target_ids, **kwargs)

    @functools.cached_property
    def prefix_cache(self) -> PrefixCache | None:
        """The prefix's KV cache, built at first use. None without a prefix or a reusable cache."""
        return self.model.cache_prefix(self.prefix_ids)

    @property
    def target_length(self) -> int:
        return self.target_ids.shape[1]

    def teacher_forced_logits(self, prompt: torch.Tensor) -> torch.Tensor:
        """Logits (S, T, V) that predict each target token given the prompt and the target tokens
        before it, in one forward pass. prompt: samples or one-hots (S, L, V), or ids (S, L)."""
        T = self.target_length
        # The last target token predicts nothing that is scored, so it stays out of the input,
        # and the logits of the last T positions predict the T target tokens. The prefix comes
        # from its cache where there is one, because it does not depend on the prompt.
        parts = [prompt, self.suffix_ids, self.target_ids[:, :-1]]
        if self.prefix_cache is None:
            parts.insert(0, self.prefix_ids)
        out = self.model(parts=parts, prefix=self.prefix_cache, logits_to_keep=T)
        return out.logits  # (S, T, V)

    def loss(self, prompt_y: torch.Tensor) -> LossOutput:
        """Score prompt samples prompt_y (S, L, V); returns the per-sample mean token loss."""
        S = prompt_y.shape[0]
        T = self.target_length
        targets = self.target_ids.expand(S, -1)  # (S, T)
        if self.mode == "teacher_forcing":
            logits = self.teacher_forced_logits(prompt_y)  # (S, T, V)
        else:
            out = self.model.generate(parts=[self.prefix_ids, prompt_y, self.suffix_ids], max_new_tokens=T)
            logits = out.logits  # (S, T, V)
        losses = token_losses(logits, targets, self.loss_type, self.margin)  # (S, T)
        hits = logits.detach().argmax(-1) == targets  # (S, T)
        return LossOutput(per_sample=losses.mean(-1), solved=hits.all(-1), accuracy=hits.float().mean(-1))

    @torch.no_grad()
    def check(self, prompt_ids: list[int]) -> CheckResult:
        """Run greedy generation from the prompt ids, and from the decoded text re-encoded."""
        tokenizer = self.model.tokenizer
        target = self.target_ids[0].tolist()
        ids = self.prefix_ids[0].tolist() + list(prompt_ids) + self.suffix_ids[0].tolist()
        output = greedy_generate(self.model, ids, len(target), draft=target)

        prompt_text = tokenizer.decode(list(prompt_ids), clean_up_tokenization_spaces=False)
        text_ids = tokenizer.encode(self.prefix + prompt_text + self.suffix, add_special_tokens=False)
        text_ids_same = text_ids == ids
        text_output = output if text_ids_same else greedy_generate(self.model, text_ids, len(target), draft=target)
        return CheckResult(
            success=exact_match(output, target),
            prompt_ids=list(prompt_ids),
            prompt_text=prompt_text,
            output_ids=output,
            output_text=tokenizer.decode(output, clean_up_tokenization_spaces=False),
            token_accuracy=token_accuracy(output, target),
            lcs_ratio=lcs_ratio(output, target),
            text_ids_same=text_ids_same,
            text_success=exact_match(text_output, target),
        )


def greedy_generate(model: STGSDiffModel, ids: list[int], max_new_tokens: int, draft: Sequence[int] = ()) -> list[int]:
    """Return the model's plain greedy continuation of `ids`, without the prompt.

    draft: tokens expected to follow `ids`, such as a target. One forward pass scores all of
    them, as speculative decoding checks a draft: the output keeps the draft up to the model's
    first disagreement, takes the model's own token there, and HF generate decodes the rest.
    A draft that the model reproduces costs one forward pass instead of one per token.

    Plain HF generate decodes the whole continuation instead in three cases. One pass over many
    positions rounds differently from one pass per position, which matters where the top two
    logits of a read position are within rounding of each other, and for weights in fewer than
    32 bits. And a generation config can change the greedy choice (a repetition penalty,
    suppressed tokens), which the draft pass does not apply.
    """
    draft = list(draft)[:max_new_tokens]
    # In bfloat16 or float16 the rounding gap covers most margins, so plain generate decodes.
    if draft and ids and model.dtype in (torch.float32, torch.float64) and _argmax_is_greedy(model.model):
        tokens, margins, tolerance = _greedy_under_draft(model, ids, draft)
        output: list[int] = []
        stop = set(model.generation_eos_ids)
        for expected, token in zip(draft, tokens):
            output.append(token)
            if token in stop or token != expected:
                break
        if min(margins[: len(output)]) > tolerance:
            if len(output) == max_new_tokens or output[-1] in stop:
                return output
            return output + greedy_generate(model, ids + output, max_new_tokens - len(output))
    input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
    hf_model = model.model
    output = hf_model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=model.pad_token_id,
    )
    return output[0, input_ids.shape[1]:].tolist()


@torch.no_grad()
def _greedy_under_draft(model: STGSDiffModel, ids: list[int], draft: list[int]) -> tuple[list[int], list[float], float]:
    """Return the argmax token after ids + draft[:i] for each i < len(draft), from one forward pass.

    Also returns the gap between the top two logits at each of those positions, and the gap
    below which rounding could swap them: a thousand rounding units of the model's dtype, times
    the largest logit's size.
    """
    input_ids = torch.tensor([ids + draft[:-1]], dtype=torch.long, device=model.device)  # (1, N + D - 1)
    kwargs = {"logits_to_keep": len(draft)} if model.keeps_logits else {}
    logits = model.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs).logits
    logits = logits[0, -len(draft):].float()  # (D, V)
    top = logits.topk(2, dim=-1)
    margins = (top.values[:, 0] - top.values[:, 1]).tolist()
    tolerance = 1000 * torch.finfo(model.dtype).eps * max(1.0, float(logits.abs().max()))
    return top.indices[:, 0].tolist(), margins, tolerance


# Generation settings that make HF generate's greedy token differ from the argmax of the logits,
# with the values that leave it alone. Another value sends the check to plain generate.
# NOTE: the list follows the processors that transformers 5.x applies without sampling. A
# processor added in a later version is missing here, so its draft check reads the raw argmax.
_ARGMAX_NEUTRAL: dict[str, tuple] = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None, []),
    "suppress_tokens": (None, []),
    "begin_suppress_tokens": (None, []),
    "sequence_bias": (None, {}),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
}


def _argmax_is_greedy(hf_model) -> bool:
    """Return whether HF generate's greedy token is the plain argmax for this model's generation config."""
    config = getattr(hf_model, "generation_config", None)
    return config is None or all(getattr(config, key, None) in neutral for key, neutral in _ARGMAX_NEUTRAL.items())
