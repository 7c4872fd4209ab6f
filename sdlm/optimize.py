"""The optimization loop: sample prompts, score them, step the optimizer, check, emit events.

`optimize(config)` is the one-call entry point. It never prints: progress goes to `on_event`
as the dataclasses below, and files go to an optional `RunDirectory`.

Example:
    >>> from sdlm.config import Config, ObjectiveConfig        # doctest: +SKIP
    >>> result = optimize(Config(objective=ObjectiveConfig(target=" innovation.")))
    >>> result.success, result.best.prompt_text
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Sequence

import torch

from sdlm.chat import chat_frame
from sdlm.checkpoint import Checkpoint, LoopState, restore_checkpoint, save_checkpoint
from sdlm.config import Config, split_dtype
from sdlm.constraints import position_mask
from sdlm.guards import apply_update, check_fits_model, check_prompt_length, check_same_vocabulary, non_finite_cause
from sdlm.objectives import CheckResult, TargetObjective
from sdlm.objectives_composite import CompositeObjective, EnsembleObjective, Term
from sdlm.objectives_keywords import KeywordsTerm
from sdlm.objectives_prompt import EntropyTerm, FluencyTerm
from sdlm.objectives_task import TaskTerm
from sdlm.polish import Polisher, Scored, join_repairs, permitted, score_prompts, target_copy
from sdlm.runs import RunDirectory
from sdlm.stgs import STGS
from sdlm.stgs_diff_model import STGSDiffModel
from sdlm.stgs_diff_string import STGSDiffString, banned_token_mask, build_vocab_mask

StopReason = Literal["success", "max_steps", "interrupted", "non_finite"]

# How many candidate prompts the loop checks with real greedy generation in one step. A
# candidate whose text works but whose ids do not adds one check of the text's own ids.
MAX_CHECKS_PER_STEP = 2
# How many single-token changes of a prompt whose ids work but whose text does not go to the
# greedy check (see mend_joins).
MAX_MEND_CHECKS = 2


# -- events ------------------------------------------------------------------------------


@dataclass
class RunStarted:
    """The start of a run. target_text and target_ids are empty when no target term is on;
    terms names every term of the objective."""

    kind = "start"
    model: str
    device: str
    target_text: str
    target_ids: list[int]
    prompt_length: int
    steps: int
    samples: int
    run_dir: str | None
    terms: list[str] = field(default_factory=list)


@dataclass
class StepEvent:
    """One optimizer step. loss: mean over samples; best_sample_loss: min over samples;
    accuracy: best teacher-forced token accuracy among samples (None in generation mode);
    terms: each scored term's unweighted loss, mean over samples. restarts: restarts so far,
    counting one made after this step. polish_matched: on polish steps, the leading target
    tokens that the polish's incumbent prompt gets right, else None."""

    kind = "step"
    step: int
    steps: int
    loss: float
    best_sample_loss: float
    accuracy: float | None
    temperature: float
    prompt_text: str
    elapsed: float
    skipped: bool = False
    terms: dict[str, float] = field(default_factory=dict)
    restarts: int = 0
    polish_matched: int | None = None


@dataclass
class EvalEvent:
    """A discrete check of one prompt; `improved` when it became the best so far."""

    kind = "eval"
    step: int
    check: CheckResult
    improved: bool
    best: CheckResult


@dataclass
class OptimizeResult:
    kind = "end"
    success: bool
    reason: StopReason
    steps: int
    seconds: float
    best: CheckResult
    best_step: int
    loss_history: list[float] = field(repr=False)
    run_dir: str | None = None
    string: STGSDiffString | None = field(default=None, repr=False)
    # Why the run stopped early, with the setting to change (reason "non_finite"), else None.
    message: str | None = None
    report: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Plain data for JSON: everything but the loss history and the string.

        report: per-term results on the initial and the best prompt, such as the task's
        accuracy on its training and held-out examples before and after the run.
        """
        return {
            "success": self.success,
            "reason": self.reason,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "best_step": self.best_step,
            "best": asdict(self.best),
            "run_dir": self.run_dir,
            "message": self.message,
            "report": self.report,
        }


Event = RunStarted | StepEvent | EvalEvent | OptimizeResult


# -- pure helpers ------------------------------------------------------------------------


def scheduled_temperature(schedule: str, start: float, end: float, step: int, total: int) -> float:
    """Temperature at `step` (1-based) of `total`, moving from `start` to `end` (both > 0)."""
    if schedule == "constant" or total <= 1:
        return start
    progress = min(max((step - 1) / (total - 1), 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "exponential":
        return start * (end / start) ** progress
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown temperature schedule {schedule!r}; use constant, linear, exponential or cosine")


def _rank(check: CheckResult, loss: float) -> tuple:
    # Greater is better: success first, then a text that also works, then closeness.
    return (check.success, check.text_success, check.token_accuracy, check.lcs_ratio, -loss)


def pasted_ids(check: CheckResult, tokenizer, allowed: torch.Tensor) -> list[int] | None:
    """Return the ids that the checked prompt's text encodes to, or None.

    None unless they differ from the prompt's ids, have the same length and are permitted by
    allowed (V,) or (L, V). With no fixed text around the prompt, the text check ran on these
    very ids, so when the text passes they pass as ids too.
    """
    ids = tokenizer.encode(check.prompt_text, add_special_tokens=False)
    if ids == check.prompt_ids or len(ids) != len(check.prompt_ids) or max(ids) >= allowed.shape[-1]:
        return None
    if not bool(permitted(allowed, torch.tensor(ids, device=allowed.device)).all()):
        return None
    return ids


def mend_joins(
    objective: CompositeObjective | EnsembleObjective | TargetObjective,
    target: TargetObjective,
    check: CheckResult,
    scores: torch.Tensor,
    allowed: torch.Tensor,
    checked: set[tuple[int, ...]],
) -> CheckResult | None:
    """Return the check of a single-token change whose ids and text both work, or None.

    check: a prompt whose ids work but whose text does not. The changes (polish.join_repairs)
    go to the joins that decode -> re-encode alters, and take each position's best tokens by
    scores (L, V) among allowed. Only changes that reproduce the whole target under teacher
    forcing on `target` and are not in `checked` go to objective.check, at most MAX_MEND_CHECKS
    of them with the lowest loss. Each checked prompt is added to `checked`.
    """
    candidates = join_repairs(target.model.tokenizer, check.prompt_ids, scores, allowed)  # (B, L)
    if not candidates.shape[0]:
        return None
    scored = score_prompts(target, candidates.to(target.model.device))
    complete = [s for s in scored if s.matched == target.target_length and s.ids not in checked]
    for candidate in sorted(complete, key=lambda s: s.loss)[:MAX_MEND_CHECKS]:
        checked.add(candidate.ids)
        mended = objective.check(list(candidate.ids))
        if mended.success and mended.text_success:
            return mended
    return None


def build_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}; use adam, adamw or sgd")


def build_prompt(config: Config, model: STGSDiffModel, generator: torch.Generator | None = None) -> STGSDiffString:
    """Build the learnable prompt that config.prompt and config.stgs describe."""
    p, s = config.prompt, config.stgs
    # The prompt length decides the shape of a per-position temperature, so it comes first.
    length = len(model.tokenizer.encode(p.init_text, add_special_tokens=False)) if p.init_text else p.length
    stgs = STGS(
        temperature=s.temperature,
        learnable_temperature=s.learnable_temperature,
        min_temperature=s.min_temperature,
        max_temperature=s.max_temperature,
        length=length,
        hard=s.hard,
        hard_method=s.hard_method,
        normalize=s.normalize,
        noise_scale=s.noise_scale,
        embedding_weight=model.embedding_weight,
    )
    vocab_mask = p.vocab_mask
    if p.banned or p.banned_ids:
        allowed = build_vocab_mask(model.tokenizer, p.vocab_mask, model.vocab_size)
        vocab_mask = allowed & ~banned_token_mask(model.tokenizer, model.vocab_size, p.banned, p.banned_ids or ())
        if not vocab_mask.any():
            raise ValueError("prompt.banned and prompt.banned_ids leave no token to use; ban fewer")
    if p.init_text:
        string = STGSDiffString(
            model.tokenizer, init_text=p.init_text, init_scale=p.init_scale,
            vocab_size=model.vocab_size, vocab_mask=vocab_mask, stgs=stgs,
        )
    else:
        string = STGSDiffString(
            model.tokenizer, length=p.length, init_scale=p.init_scale, vocab_size=model.vocab_size,
            vocab_mask=vocab_mask, stgs=stgs, generator=generator,
        )
    if p.constraints:
        string.constrain(position_mask(model.tokenizer, string.length, model.vocab_size, p.constraints))
    return string.to(model.device)


def build_objective(config: Config, model: STGSDiffModel, string: STGSDiffString | None = None) -> CompositeObjective:
    """Build the weighted terms that config turns on. Only the entropy term needs `string`."""
    o, p = config.objective, config.prompt
    prefix, suffix = chat_frame(model.tokenizer, p.chat, p.prefix, p.suffix, p.chat_message)
    terms: list[tuple[float, Term]] = []
    if o.target is not None or o.target_ids is not None:
        kwargs = dict(prefix=prefix, suffix=suffix, mode=o.mode, loss=o.loss, margin=o.margin)
        if o.target_ids:
            target = TargetObjective(model, list(o.target_ids), **kwargs)
        else:
            target = TargetObjective.from_text(model, o.target, **kwargs)
        terms.append((o.weight, target))
    k = config.keywords
    if k.require or k.avoid:
        terms.append((k.weight, KeywordsTerm(
            model, require=k.require, avoid=k.avoid, prefix=prefix, suffix=suffix,
            max_new_tokens=k.max_new_tokens, case_sensitive=k.case_sensitive,
        )))
    if config.task.examples or config.task.path is not None:
        terms.append((config.task.weight, TaskTerm.from_config(model, config.task, seed=config.seed, margin=o.margin)))
    if config.fluency.weight > 0 or config.fluency.max_perplexity is not None:
        terms.append((config.fluency.weight, FluencyTerm(model, prefix=prefix, max_perplexity=config.fluency.max_perplexity)))
    if config.entropy.weight != 0:
        if string is None:
            raise ValueError("the entropy term needs the learnable string: pass string=")
        terms.append((config.entropy.weight, EntropyTerm(string)))
    return CompositeObjective(model, terms, prefix=prefix)


def load_diff_model(config: Config, spec: str | None = None, *, compile_default: bool = False) -> STGSDiffModel:
    """Load config.model (or `spec` with its settings) and wrap it; generated tokens use config.stgs's temperature and mode.

    spec may end in "@DTYPE" (an ensemble entry such as "smollm2@bfloat16") to override model.dtype.
    compile_default: whether to compile when model.compile is null.
    """
    from sdlm.models import load_model

    m = config.model
    spec, dtype = split_dtype(spec) if spec else (m.spec, None)
    hf_model, tokenizer = load_model(spec, device=m.device, dtype=dtype or m.dtype, trust_remote_code=m.trust_remote_code)
    s = config.stgs
    compile = compile_default if m.compile is None else m.compile
    stgs = STGS(temperature=s.temperature, hard=s.hard, noise_scale=s.noise_scale)
    return STGSDiffModel(hf_model, tokenizer, stgs=stgs, compile=compile)


def _scored_state(scored: Scored | None) -> list | None:
    return None if scored is None else [list(scored.ids), scored.matched, scored.loss]


# -- the loop ----------------------------------------------------------------------------


def optimize(
    config: Config,
    *,
    model: STGSDiffModel | None = None,
    run: RunDirectory | None = None,
    on_event: Callable[[Event], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: Checkpoint | None = None,
    ensemble: Sequence[STGSDiffModel] | None = None,
) -> OptimizeResult:
    """Optimize a prompt for `config`; return the best discrete prompt found and how the run ended.

    model: a ready STGSDiffModel (else config.model is loaded). run: where to write metrics,
    the best prompt, the learned string and checkpoints. should_stop: polled after each step;
    True ends the run with reason "interrupted". resume: a checkpoint of an earlier run of the
    same config, which this run continues from the step after it. ensemble: ready models that
    score the prompt too (else those of config.model.ensemble are loaded).

    Raises ConfigError when the target does not fit the model (vocabulary or context), and
    CheckpointError when `resume` does not fit the config.
    """
    emit = on_event or (lambda event: None)
    torch.manual_seed(config.seed)
    model = model if model is not None else load_diff_model(config)
    if ensemble is None:
        ensemble = [load_diff_model(config, spec) for spec in config.model.ensemble]
    generator = torch.Generator(device=model.device).manual_seed(config.seed)
    check_prompt_length(config, model)
    string = build_prompt(config, model, generator)
    initial_ids = string.ids.tolist()  # before a checkpoint replaces the logits
    objective = build_objective(config, model, string)
    check_fits_model(config, model, objective, string)
    search = config.search
    polisher = None
    if search.polish_every and objective.target is not None:
        polisher = Polisher(
            objective.target, string.allowed_mask, width=search.polish_width, topk=search.polish_topk,
            tokenizer=model.tokenizer if config.eval.require_text else None,
        )
        if search.polish_from == "target" and (resume is None or resume.state.incumbent is None):
            copy = target_copy(objective.target.target_ids[0], string.ids, string.allowed_mask)  # (L,)
            polisher.offer(copy.unsqueeze(0))
    target = objective.target  # the target term of the first model, or None
    if ensemble:
        check_same_vocabulary(model, ensemble)
        others = [build_objective(config, extra, string) for extra in ensemble]
        objective = EnsembleObjective([objective, *others])
    params = list(string.parameters())
    optimizer = build_optimizer(config.optimizer.name, params, config.optimizer.lr)
    opt, s = config.optimizer, config.stgs
    final_temperature = opt.final_temperature or s.min_temperature
    state = LoopState(step=0)
    if resume is not None:
        restore_checkpoint(resume, string, optimizer, generator)
        state = resume.state
        if polisher is not None and state.incumbent is not None:
            ids, matched, incumbent_loss = state.incumbent
            polisher.incumbent = Scored(tuple(ids), matched, incumbent_loss)
            if state.polish_track is not None:
                ids, matched, track_loss = state.polish_track
                polisher.track = Scored(tuple(ids), matched, track_loss)
    emit(RunStarted(
        model=config.model.spec, device=str(model.device), target_text=objective.target_text,
        target_ids=objective.target_ids[0].tolist(), prompt_length=string.length, steps=opt.steps,
        samples=config.prompt.samples, run_dir=str(run.path) if run else None, terms=objective.names,
    ))

    start = time.perf_counter() - state.seconds
    best: CheckResult | None = CheckResult(**state.best) if state.best is not None else None
    best_step = state.best_step
    best_loss = state.best_loss
    best_key = _rank(best, best_loss) if best is not None else None
    history: list[float] = list(state.history)
    checked: set[tuple[int, ...]] = {tuple(ids) for ids in state.checked}
    reason: StopReason = "max_steps"
    message: str | None = None
    non_finite_in_a_row = state.non_finite_in_a_row
    restart_low, restart_step, restarts = state.restart_low, state.restart_step, state.restarts
    # [ids, accuracy, loss] of the restart anchor. NOTE: a checkpoint written before anchors were
    # saved resumes with none, so its next biased restart starts near a sample drawn after the resume.
    anchor: list | None = state.anchor
    step = state.step
    if run and best is not None:
        run.write_best({"step": best_step, "loss": state.best_loss} | state.best)

    def consider(ids: list[int], loss: float, step: int) -> bool:
        """Check one prompt; update the best. Returns True on success."""
        nonlocal best, best_step, best_key, best_loss
        check = objective.check(ids)
        if check.text_success and not check.success:
            # The pasted text works though the sampled ids do not: check the ids of that text,
            # and keep them if they pass. They are ranked with the sampled prompt's loss.
            text_ids = pasted_ids(check, model.tokenizer, string.allowed_mask)
            if text_ids is not None and tuple(text_ids) not in checked:
                checked.add(tuple(text_ids))
                text_check = objective.check(text_ids)
                if text_check.success:
                    check = text_check
        elif check.success and not check.text_success and config.eval.require_text and target is not None:
            check = mend_joins(objective, target, check, string.logits[0], string.allowed_mask, checked) or check
        key = _rank(check, loss)
        improved = best_key is None or key > best_key
        if improved:
            best, best_step, best_key, best_loss = check, step, key, loss
            if run:
                run.write_best({"step": step, "loss": loss} | asdict(check))
        emit(EvalEvent(step=step, check=check, improved=improved, best=best))
        return check.meets(config.eval.require_text)

    def loop_state() -> LoopState:
        return LoopState(
            step=step, seconds=time.perf_counter() - start, history=history,
            best=asdict(best) if best is not None else None, best_step=best_step, best_loss=best_loss,
            checked=[list(ids) for ids in checked], non_finite_in_a_row=non_finite_in_a_row,
            incumbent=_scored_state(polisher.incumbent if polisher else None),
            polish_track=_scored_state(polisher.track if polisher else None), restart_low=restart_low, restart_step=restart_step,
            restarts=restarts, anchor=anchor,
        )

    # A resumed run that had already met its objective has nothing left to do.
    done = best is not None and best.meets(config.eval.require_text) and config.eval.stop_on_success
    last_step = state.step if done else opt.steps
    for step in range(state.step + 1, last_step + 1):
        # Sample S prompts at this step's temperature (a schedule applies to a fixed temperature).
        temperature = None
        if s.learnable_temperature == "none":
            temperature = scheduled_temperature(opt.temperature_schedule, s.temperature, final_temperature, step, opt.steps)
        draw = string.sample(config.prompt.samples, generator=generator, temperature=temperature)

        # Score them and step the optimizer, skipping updates with a non-finite loss or gradient.
        scored = objective.loss(draw.y)
        loss = scored.per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, opt.grad_clip or float("inf"))
        non_finite = apply_update(optimizer, params, loss.detach(), grad_norm)
        non_finite_in_a_row = 0 if non_finite is None else non_finite_in_a_row + 1

        # Record the step.
        per_sample = scored.per_sample.detach()
        loss_value = float(loss.detach())
        history.append(loss_value)
        lowest_loss = float(per_sample.min())
        # The restart anchor: the sample with the most target tokens right in the step's scoring
        # so far, then the lowest loss (the lowest loss alone where no term counts tokens).
        # Samples with a non-finite loss never become the anchor.
        by_loss = per_sample.argsort()  # (S,) sample indices, lowest loss first (NaN last)
        sample_accuracy = torch.zeros_like(per_sample) if scored.accuracy is None else scored.accuracy.float()
        sample_accuracy = sample_accuracy.masked_fill(~torch.isfinite(per_sample), -1.0)  # (S,)
        top = int(by_loss[sample_accuracy[by_loss].argmax()])
        top_accuracy, top_loss = float(sample_accuracy[top]), float(per_sample[top])
        if math.isfinite(top_loss) and (anchor is None or (top_accuracy, -top_loss) > (anchor[1], -anchor[2])):
            anchor = [draw.ids[top].tolist(), top_accuracy, top_loss]
        tau = float(draw.temperature.detach().float().mean())

        # Run a polish round, and decide on a restart, before the event that reports both.
        polished: Scored | None = None
        polish_improved = False
        if polisher is not None and step > search.polish_after and step % search.polish_every == 0:
            before = polisher.incumbent
            if search.polish_from == "best":
                # The argmax prompt and the step's best sample compete with the incumbent first.
                polisher.offer(torch.stack([string.ids, draw.ids[int(per_sample.argmin())]]))
            # Each round draws from its own generator, seeded by the run's seed and the step, so
            # the relaxed search's draws are the same with or without the polish.
            polisher.generator = torch.Generator(device=generator.device).manual_seed(config.seed * 1_000_003 + step)
            polished = polisher.polish()
            polish_improved = polished != before
        restart = False
        if search.restart_patience:
            if restart_low is None or lowest_loss < restart_low:
                restart_low, restart_step = lowest_loss, step
            elif step - restart_step >= search.restart_patience:
                restart = True
                restarts += 1

        event = StepEvent(
            step=step, steps=opt.steps, loss=loss_value, best_sample_loss=lowest_loss,
            accuracy=None if scored.accuracy is None else float(scored.accuracy.max()),
            temperature=tau, prompt_text=string.text, elapsed=time.perf_counter() - start,
            skipped=non_finite is not None,
            terms={name: float(value.mean()) for name, value in scored.terms.items()},
            restarts=restarts, polish_matched=None if polished is None else polished.matched,
        )
        if run:
            run.append_metrics({k: v for k, v in asdict(event).items() if k != "prompt_text"})
        emit(event)
        if non_finite_in_a_row >= opt.max_non_finite:
            reason = "non_finite"
            cause = non_finite_cause(non_finite, config, model, bool(torch.isfinite(draw.probs).all()), tau)
            message = (
                f"stopped after {non_finite_in_a_row} steps in a row with a non-finite {non_finite} "
                f"(each update skipped): {cause}"
            )
            break

        # Check candidates with real greedy generation: samples whose teacher-forced argmax
        # already matches, and the argmax prompt every eval.every steps.
        candidates: list[tuple[list[int], float]] = []
        if scored.solved is not None:
            for i in scored.solved.nonzero().view(-1).tolist():
                candidates.append((draw.ids[i].tolist(), float(per_sample[i])))
        if step % config.eval.every == 0 or step == opt.steps:
            candidates.append((string.ids.tolist(), lowest_loss))
        if polished is not None and (polish_improved or polisher.solved):
            # A better incumbent goes to the greedy check, and so does one that reproduced the
            # target from the start, as a target copy can. The checked set allows one check each.
            candidates.insert(0, (list(polished.ids), polished.loss))
        success = False
        n_checked = 0
        for ids, sample_loss in candidates:
            if tuple(ids) in checked or n_checked >= MAX_CHECKS_PER_STEP:
                continue
            checked.add(tuple(ids))
            n_checked += 1
            success = consider(ids, sample_loss, step) or success
        if success and config.eval.stop_on_success:
            reason = "success"
            break

        # Restart when the lowest loss has not improved for search.restart_patience steps, near
        # the anchor sample when search.restart_bias is set.
        if restart:
            string.reinitialize(generator, around=anchor[0] if anchor else None, bias=search.restart_bias)
            optimizer.state.clear()
            restart_low, restart_step = None, step

        # Save a checkpoint every eval.checkpoint_every steps, then honour a stop request.
        every = config.eval.checkpoint_every
        if run and every and step % every == 0:
            save_checkpoint(run.path, loop_state(), string, optimizer, generator)
        if should_stop is not None and should_stop():
            reason = "interrupted"
            break

    # The final checkpoint stores the loop state as it ended, before the fallback check below.
    if run:
        save_checkpoint(run.path, loop_state(), string, optimizer, generator)
    if best is None:
        consider(string.ids.tolist(), history[-1] if history else float("nan"), step)
    if run:
        run.save_string(string)
    succeeded = best.meets(config.eval.require_text)
    result = OptimizeResult(
        success=succeeded, reason=reason if reason != "max_steps" or not succeeded else "success",
        steps=step, seconds=time.perf_counter() - start, best=best, best_step=best_step,
        loss_history=history, run_dir=str(run.path) if run else None, string=string, message=message,
        report=objective.report(initial_ids, best.prompt_ids),
    )
    if run:
        run.write_summary(result.summary())
        run.close()
    emit(result)
    return result
