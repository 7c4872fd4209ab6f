"""A composite objective: a weighted sum of term losses, and a check that every term passes.

A term is any object with `name`, `primary`, `loss(prompt_y) -> LossOutput` and
`check(prompt_ids) -> CheckResult`. `primary` is True when the check judges the model's output,
as target, keywords and task do. A term may also have `report(initial_ids, final_ids) -> dict`.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from sdlm.objectives import CheckResult, LossOutput, TargetObjective
from sdlm.objectives_prompt import prompt_perplexity
from sdlm.stgs_diff_model import STGSDiffModel


class Term(Protocol):
    name: str
    primary: bool

    def loss(self, prompt_y: torch.Tensor) -> LossOutput: ...

    def check(self, prompt_ids: list[int]) -> CheckResult: ...


class CompositeObjective:
    """loss = sum of weight * term loss; success = every term's check passes.

    Terms with weight 0 are checked but not scored. The check's output fields (output, token
    accuracy, LCS ratio) come from the first primary term. Its metrics contain every term's
    metrics as "<term>.<name>" and "prompt_perplexity", the prompt's perplexity under the
    model after `prefix` (absent for a one-token prompt with no prefix).
    """

    def __init__(self, model: STGSDiffModel, terms: list[tuple[float, Term]], *, prefix: str = "") -> None:
        if not terms:
            raise ValueError("a composite objective needs at least one term")
        names = [term.name for _, term in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"term names must be distinct, got {names}")
        self.model = model
        self.terms = list(terms)
        self.prefix_ids = model.encode(prefix)  # (1, P)
        primaries = [term for _, term in terms if term.primary]
        self.primary = primaries[0] if primaries else terms[0][1]

    @property
    def names(self) -> list[str]:
        return [term.name for _, term in self.terms]

    @property
    def target(self) -> TargetObjective | None:
        return next((term for _, term in self.terms if isinstance(term, TargetObjective)), None)

    @property
    def target_text(self) -> str:
        return self.target.target_text if self.target is not None else ""

    @property
    def target_ids(self) -> torch.Tensor:
        if self.target is not None:
            return self.target.target_ids
        return torch.zeros(1, 0, dtype=torch.long, device=self.model.device)

    def loss(self, prompt_y: torch.Tensor) -> LossOutput:
        """Weighted sum (S,) of the term losses; solved where every term that gives a hint agrees."""
        S = prompt_y.shape[0]
        per_sample = prompt_y.new_zeros(S, dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        solved, accuracy = None, None
        for weight, term in self.terms:
            if weight == 0:
                continue
            out = term.loss(prompt_y)
            per_sample = per_sample + weight * out.per_sample.float()
            parts[term.name] = out.per_sample.detach()
            if out.solved is not None:
                solved = out.solved if solved is None else solved & out.solved
            if accuracy is None and out.accuracy is not None:
                accuracy = out.accuracy
        return LossOutput(per_sample=per_sample, solved=solved, accuracy=accuracy, terms=parts)

    @torch.no_grad()
    def check(self, prompt_ids: list[int]) -> CheckResult:
        results = {term.name: term.check(prompt_ids) for _, term in self.terms}
        metrics: dict[str, float] = {}
        perplexity = prompt_perplexity(self.model, self.prefix_ids, list(prompt_ids))
        if perplexity is not None:
            metrics["prompt_perplexity"] = perplexity
        for name, result in results.items():
            metrics.update({f"{name}.{key}": value for key, value in result.metrics.items()})
        return dataclasses.replace(
            results[self.primary.name],
            success=all(r.success for r in results.values()),
            text_success=all(r.text_success for r in results.values()),
            metrics=metrics,
            terms={name: r.success for name, r in results.items()},
        )

    def report(self, initial_ids: list[int], final_ids: list[int]) -> dict:
        """Collect each term's report on the initial and the final prompt, for terms that make one."""
        reports = {}
        for _, term in self.terms:
            make_report = getattr(term, "report", None)
            if make_report is not None:
                reports[term.name] = make_report(initial_ids, final_ids)
        return reports


class EnsembleObjective:
    """The same objective on several models that share one vocabulary.

    loss: the mean over models of each model's per-sample loss. check: success needs every
    model's check to pass. The output fields come from the first model; metrics and terms of
    the others are added as "model<i>.<name>" (i from 1). The report is the first model's.
    """

    def __init__(self, objectives: list[CompositeObjective]) -> None:
        if not objectives:
            raise ValueError("an ensemble needs at least one objective")
        vocab_sizes = {objective.model.vocab_size for objective in objectives}
        if len(vocab_sizes) != 1:
            raise ValueError(f"ensemble models must have the same vocabulary size, got {sorted(vocab_sizes)}")
        self.objectives = list(objectives)
        self.first = objectives[0]

    names = property(lambda self: self.first.names)
    target_text = property(lambda self: self.first.target_text)
    target_ids = property(lambda self: self.first.target_ids)

    def loss(self, prompt_y: torch.Tensor) -> LossOutput:
        outputs = [objective.loss(prompt_y) for objective in self.objectives]
        per_sample = torch.stack([out.per_sample for out in outputs]).mean(0)
        hints = [out.solved for out in outputs if out.solved is not None]
        solved = torch.stack(hints).all(0) if hints else None
        terms = dict(outputs[0].terms)
        for index, out in enumerate(outputs[1:], start=1):
            terms.update({f"model{index}.{name}": value for name, value in out.terms.items()})
        return LossOutput(per_sample=per_sample, solved=solved, accuracy=outputs[0].accuracy, terms=terms)

    @torch.no_grad()
    def check(self, prompt_ids: list[int]) -> CheckResult:
        results = [objective.check(prompt_ids) for objective in self.objectives]
        metrics, terms = dict(results[0].metrics), dict(results[0].terms)
        for index, result in enumerate(results[1:], start=1):
            metrics.update({f"model{index}.{name}": value for name, value in result.metrics.items()})
            terms.update({f"model{index}.{name}": passed for name, passed in result.terms.items()})
        return dataclasses.replace(
            results[0],
            success=all(r.success for r in results),
            text_success=all(r.text_success for r in results),
            metrics=metrics,
            terms=terms,
        )

    def report(self, initial_ids: list[int], final_ids: list[int]) -> dict:
        return self.first.report(initial_ids, final_ids)
