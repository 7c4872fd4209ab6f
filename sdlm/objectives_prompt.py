"""Terms on the prompt itself: fluency (its perplexity under the model) and entropy.

Shapes: `S` Gumbel samples, `L` prompt length, `P` fixed prefix length, `V` vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sdlm.objectives import CheckResult, LossOutput
from sdlm.stgs_diff_model import STGSDiffModel
from sdlm.stgs_diff_string import STGSDiffString


def prompt_nll(model: STGSDiffModel, prefix_ids: torch.Tensor, prompt_y: torch.Tensor) -> torch.Tensor | None:
    """Mean negative log-likelihood (S,) of the prompt tokens under the model, teacher-forced.

    prompt_y (S, L, V) contains one-hot (or soft) tokens. Each is the target of the prediction
    from the positions before it, through a soft cross-entropy -sum_v y[v] log p[v], so the
    gradient reaches the prompt both as input and as target. Without a prefix the first token
    has no context and is not scored; returns None when no token is scored.
    """
    S, L, V = prompt_y.shape
    P = prefix_ids.shape[1]
    scored = L if P > 0 else L - 1
    if scored == 0:
        return None
    # The logits of the last scored + 1 positions; all but the last predict prompt tokens.
    # NOTE: this runs the prefix at every step. The target term takes it from a KV cache, but
    # here the prefix's last position predicts the first prompt token, so a cache would also
    # have to keep that position's logits.
    out = model(parts=[prefix_ids, prompt_y], logits_to_keep=scored + 1)
    log_probs = F.log_softmax(out.logits[:, :scored], dim=-1)  # (S, scored, V)
    targets = prompt_y[:, L - scored:].to(log_probs.dtype)  # (S, scored, V)
    return -(targets * log_probs).sum(-1).mean(-1)


@torch.no_grad()
def prompt_perplexity(model: STGSDiffModel, prefix_ids: torch.Tensor, prompt_ids: list[int]) -> float | None:
    """Perplexity of the discrete prompt tokens under the model, or None when no token is scored
    or the value is not finite."""
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    one_hot = F.one_hot(ids, model.vocab_size).float()  # (1, L, V)
    nll = prompt_nll(model, prefix_ids, one_hot)
    if nll is None:
        return None
    nll_value = float(nll[0])
    # A non-finite or overflowing value (a float16 model can overflow) has no perplexity to report.
    if not math.isfinite(nll_value) or nll_value > 700:
        return None
    return math.exp(nll_value)


def prompt_check(
    prompt_ids: list[int], prompt_text: str, success: bool, score: float, *, text_ids_same: bool = True,
    text_success: bool | None = None, metrics: dict[str, float] | None = None,
) -> CheckResult:
    """Build the CheckResult of a term that judges the prompt alone, with no generated output."""
    return CheckResult(
        success=success, prompt_ids=list(prompt_ids), prompt_text=prompt_text, output_ids=[], output_text="",
        token_accuracy=score, lcs_ratio=score, text_ids_same=text_ids_same,
        text_success=success if text_success is None else text_success, metrics=metrics or {},
    )


class FluencyTerm:
    """Penalize the prompt's mean negative log-likelihood under the model, after a fixed prefix.

    The check passes when the discrete prompt's perplexity is at most max_perplexity (always
    when it is None), for the ids and for the decoded text re-encoded.
    """

    name = "fluency"
    primary = False

    def __init__(self, model: STGSDiffModel, *, prefix: str = "", max_perplexity: float | None = None) -> None:
        self.model = model
        self.prefix = prefix
        self.prefix_ids = model.encode(prefix)  # (1, P)
        self.max_perplexity = max_perplexity

    def loss(self, prompt_y: torch.Tensor) -> LossOutput:
        nll = prompt_nll(self.model, self.prefix_ids, prompt_y)
        if nll is None:
            # A one-token prompt with no prefix: nothing to score, a zero that keeps the graph.
            nll = prompt_y.float().sum((1, 2)) * 0
        return LossOutput(per_sample=nll)

    def _passes(self, perplexity: float | None) -> bool:
        return self.max_perplexity is None or perplexity is None or perplexity <= self.max_perplexity

    def check(self, prompt_ids: list[int]) -> CheckResult:
        tokenizer = self.model.tokenizer
        perplexity = prompt_perplexity(self.model, self.prefix_ids, prompt_ids)
        text = tokenizer.decode(list(prompt_ids), clean_up_tokenization_spaces=False)
        text_ids = tokenizer.encode(text, add_special_tokens=False)
        text_ids_same = text_ids == list(prompt_ids)
        text_perplexity = perplexity if text_ids_same or not text_ids else prompt_perplexity(self.model, self.prefix_ids, text_ids)
        success = self._passes(perplexity)
        metrics = {} if perplexity is None else {"perplexity": perplexity}
        return prompt_check(
            prompt_ids, text, success, float(success), text_ids_same=text_ids_same,
            text_success=self._passes(text_perplexity), metrics=metrics,
        )


def masked_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy in nats over positions of softmax(logits) (1, L, V), counting allowed tokens only.

    mask: (V,) or (L, V) bool of allowed tokens.
    """
    # A large finite fill in place of -inf: disallowed tokens get probability 0 and a finite
    # log-probability, so p log p and its gradient are 0 there rather than NaN.
    masked = logits.float().masked_fill(~mask, -1e9)
    log_probs = F.log_softmax(masked, dim=-1)
    plogp = torch.where(mask, log_probs.exp() * log_probs, torch.zeros_like(log_probs))
    return -plogp.sum(-1).mean(-1)  # (1,)


class EntropyTerm:
    """The mean entropy of the string's per-position token distributions (softmax of its masked logits).

    It shapes the distribution, not the discrete prompt, so its check always passes; the check
    reports the current entropy.
    """

    name = "entropy"
    primary = False

    def __init__(self, string: STGSDiffString) -> None:
        self.string = string

    def loss(self, prompt_y: torch.Tensor) -> LossOutput:
        entropy = masked_entropy(self.string.logits, self.string.allowed_mask)  # (1,)
        return LossOutput(per_sample=entropy.expand(prompt_y.shape[0]))

    @torch.no_grad()
    def check(self, prompt_ids: list[int]) -> CheckResult:
        entropy = float(masked_entropy(self.string.logits, self.string.allowed_mask)[0])
        text = self.string.decode(list(prompt_ids))
        return prompt_check(prompt_ids, text, True, 1.0, metrics={"entropy": entropy})
