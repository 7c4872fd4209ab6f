"""Guards around the optimization loop: inputs that do not fit the model, and non-finite steps.

The checks before the loop raise a one-line ConfigError naming the key to change. The
non-finite helpers skip or undo a bad update and name its likely cause.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sdlm.config import Config, ConfigError
from sdlm.objectives_composite import CompositeObjective
from sdlm.stgs_diff_model import STGSDiffModel
from sdlm.stgs_diff_string import STGSDiffString


# -- checks before the loop -------------------------------------------------------------


def model_context_length(model: STGSDiffModel) -> int | None:
    """Return the model's maximum sequence length from its config, or None when it names none."""
    hf_config = model.model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_prompt_length(config: Config, model: STGSDiffModel) -> None:
    """Raise ConfigError when the prompt with prefix and suffix fills the model's context.

    It runs before the prompt's (1, L, V) logits are allocated, which for a length far past the
    context would fail with an allocator error instead of naming the key.
    """
    context = model_context_length(model)
    if context is None:
        return
    p = config.prompt
    encode = lambda text: len(model.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    prompt_key = "prompt.init_text" if p.init_text else "prompt.length"
    prompt_length = encode(p.init_text) if p.init_text else p.length
    fixed = encode(p.prefix) + encode(p.suffix)
    if prompt_length + fixed >= context:
        raise ConfigError(
            f"{prompt_key}: a {prompt_length}-token prompt plus {fixed} tokens of prompt.prefix and "
            f"prompt.suffix leave no room for the target in the model's context of {context} tokens "
            f"(shorten {prompt_key} or the prefix and suffix)",
            key=prompt_key, value=prompt_length,
        )


def check_fits_model(config: Config, model: STGSDiffModel, objective: CompositeObjective, string: STGSDiffString) -> None:
    """Raise ConfigError when the target ids lie outside the vocabulary, contain an
    end-of-sequence token before their last position, or when prefix, prompt,
    suffix and target together exceed the model's context (`check_prompt_length` has already
    checked the prompt without the target)."""
    target = objective.target
    if target is None:
        return
    target_ids = target.target_ids[0].tolist()
    target_key = "objective.target_ids" if config.objective.target_ids else "objective.target"
    for index, token_id in enumerate(target_ids):
        if token_id >= model.vocab_size:
            raise ConfigError(
                f"{target_key}[{index}]: token id {token_id} is outside the model's vocabulary of "
                f"{model.vocab_size} tokens (use ids below {model.vocab_size})",
                key=f"{target_key}[{index}]", value=token_id,
            )

    # Greedy generation stops at an end-of-sequence token, so one before the last target
    # position makes the target unreachable.
    stop = set(model.generation_eos_ids)
    for index, token_id in enumerate(target_ids[:-1]):
        if token_id in stop:
            text = model.tokenizer.decode([token_id])
            raise ConfigError(
                f"{target_key}[{index}]: token id {token_id} ({text!r}) ends generation, so the model "
                f"stops before the rest of the target (remove it, or keep it only as the last token)",
                key=f"{target_key}[{index}]", value=token_id,
            )

    context = model_context_length(model)
    if context is None:
        return
    prompt_key = "prompt.init_text" if config.prompt.init_text else "prompt.length"
    fixed = target.prefix_ids.shape[1] + target.suffix_ids.shape[1]
    prompt_length, target_length = string.length, len(target_ids)
    if prompt_length + fixed + target_length > context:
        raise ConfigError(
            f"{target_key}: {target_length} tokens plus a {prompt_length}-token prompt and {fixed} tokens of "
            f"prefix and suffix exceed the model's context of {context} tokens "
            f"(shorten {target_key} to at most {context - prompt_length - fixed} tokens, or shorten the prompt)",
            key=target_key, related_keys=(prompt_key,), value=target_length,
        )


def check_same_vocabulary(model: STGSDiffModel, others: Sequence[STGSDiffModel]) -> None:
    """Raise ValueError unless every model has the same embedding rows and tokenizer vocabulary as `model`."""
    vocab = model.tokenizer.get_vocab()
    for index, other in enumerate(others, start=1):
        if other.vocab_size != model.vocab_size or other.tokenizer.get_vocab() != vocab:
            raise ValueError(
                f"ensemble model {index} does not share the first model's vocabulary "
                f"({other.vocab_size} embedding rows against {model.vocab_size}); use models with one tokenizer"
            )


# -- non-finite steps ----------------------------------------------------------------------


def apply_update(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], loss: torch.Tensor, grad_norm: torch.Tensor) -> str | None:
    """Step the optimizer unless the loss or the gradient is non-finite, and undo a step that
    made a parameter non-finite.

    Returns None when the update was applied, else what was non-finite: "loss", "gradient" or
    "update". An undone update still advanced the optimizer's moment estimates.
    """
    if not bool(torch.isfinite(loss)):
        return "loss"
    if not bool(torch.isfinite(grad_norm)):
        return "gradient"
    before = [param.detach().clone() for param in params]
    try:
        optimizer.step()
    except RuntimeError as error:
        # torch.optim raises this when a learning rate such as 1e300 does not fit in float32.
        if "overflow" not in str(error):
            raise
    else:
        if all(bool(torch.isfinite(param).all()) for param in params):
            return None
    with torch.no_grad():
        for param, saved in zip(params, before):
            param.copy_(saved)
    return "update"


def non_finite_cause(kind: str, config: Config, model: STGSDiffModel, soft_finite: bool, temperature: float) -> str:
    """Name the likely cause of a non-finite `kind` ("loss", "gradient", "update") and the setting to change."""
    lr = config.optimizer.lr
    dtype = str(model.embedding_weight.dtype).removeprefix("torch.")
    if kind == "update":
        return (
            f"the update made the prompt logits non-finite, so optimizer.lr ({lr:g}) is likely too high; "
            "lower optimizer.lr"
        )
    if not soft_finite:
        return (
            f"the soft sample is non-finite at temperature {temperature:g}, which is too low; raise "
            "stgs.temperature (and stgs.min_temperature or optimizer.final_temperature when it is learned or scheduled)"
        )
    if dtype in ("float16", "bfloat16"):
        return f"the model's {dtype} arithmetic overflowed; set model.dtype to float32"
    if kind == "gradient":
        return (
            f"the gradient overflowed; set optimizer.grad_clip (such as 1.0) or lower optimizer.lr ({lr:g})"
        )
    return "the model returned a non-finite loss in float32; check the model's weights and stgs.temperature"
