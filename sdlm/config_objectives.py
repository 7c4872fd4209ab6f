"""Config sections of the objective terms added to the target: fluency, entropy, keywords, task.

The loss is the weighted sum of every term that is on, and a run succeeds only when the
discrete prompt passes the check of every term that is on. A term is on when:

- ``objective`` (the target): ``objective.target`` or ``objective.target_ids`` is set;
- ``fluency``: ``fluency.weight`` > 0 or ``fluency.max_perplexity`` is set;
- ``entropy``: ``entropy.weight`` is not 0;
- ``keywords``: ``keywords.require`` or ``keywords.avoid`` lists a word;
- ``task``: ``task.examples`` or ``task.path`` gives examples.

Like sdlm.config, which wires these sections into Config, this module must not import torch.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from sdlm.config_fields import ConfigError, _option, _show, _to_text, _type_error, _Validated

TaskLoss = Literal["cross_entropy", "margin"]

TEMPLATE_FIELDS = ("prompt", "input")


def to_word_list(value: Any, key: str) -> list[str]:
    """Validate a list of non-empty texts; numbers are read back as text."""
    expected = "a list of non-empty texts"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise _type_error(key, expected, value, f"write {key} as a YAML list, such as [first, second]")
    words = []
    for index, item in enumerate(value):
        item_key = f"{key}[{index}]"
        if isinstance(item, bool) or item is None:
            raise _type_error(item_key, "non-empty text", item, "quote the word")
        word = _to_text(item, item_key)
        if not word.strip():
            raise _type_error(item_key, "non-empty text", item, "remove the empty entry")
        words.append(word)
    return words


def _to_examples(value: Any, key: str) -> list[dict[str, str]]:
    """Validate a list of {input, output} mappings of text."""
    expected = "a list of mappings with the keys input and output"
    fix = f"write each item of {key} as {{input: ..., output: ...}}"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise _type_error(key, expected, value, fix)
    examples = []
    for index, item in enumerate(value):
        item_key = f"{key}[{index}]"
        if not isinstance(item, Mapping):
            raise _type_error(item_key, "a mapping with the keys input and output", item, fix)
        unknown = [name for name in item if name not in ("input", "output")]
        if unknown:
            raise ConfigError(
                f"{item_key}: unknown key {_show(unknown[0])} (an example has only input and output)",
                key=item_key,
                value=item,
            )
        example = {}
        for name in ("input", "output"):
            if item.get(name) is None:
                raise ConfigError(f"{item_key}.{name}: missing ({fix})", key=item_key, value=item)
            if isinstance(item[name], bool):
                raise _type_error(f"{item_key}.{name}", "text", item[name], "quote the value")
            example[name] = _to_text(item[name], f"{item_key}.{name}")
        if not example["output"].strip():
            raise _type_error(f"{item_key}.output", "non-empty text", example["output"])
        examples.append(example)
    return examples


CHAR_CLASSES = ("alpha", "digit", "alnum", "upper", "lower", "space", "ascii")
CONSTRAINT_KINDS = ("text", "tokens", "chars")


def to_constraints(value: Any, key: str) -> list[dict[str, Any]]:
    """Validate a list of {position, text | tokens | chars} mappings of per-position constraints."""
    fix = f"write each item of {key} as {{position: N, text: ...}}, {{position: N, tokens: [...]}} or {{position: N, chars: alpha}}"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise _type_error(key, "a list of mappings", value, fix)
    constraints = []
    for index, item in enumerate(value):
        item_key = f"{key}[{index}]"
        if not isinstance(item, Mapping):
            raise _type_error(item_key, "a mapping", item, fix)
        unknown = [name for name in item if name not in ("position", *CONSTRAINT_KINDS)]
        if unknown:
            raise ConfigError(f"{item_key}: unknown key {_show(unknown[0])} ({fix})", key=item_key, value=item)
        kinds = [name for name in CONSTRAINT_KINDS if name in item]
        if len(kinds) != 1:
            raise ConfigError(f"{item_key}: expected exactly one of text, tokens or chars, got {kinds or 'none'} ({fix})", key=item_key, value=item)
        position = item.get("position")
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise _type_error(f"{item_key}.position", "an integer >= 0", position, "positions count prompt tokens from 0")
        kind = kinds[0]
        if kind == "text":
            if isinstance(item["text"], bool) or item["text"] is None:
                raise _type_error(f"{item_key}.text", "non-empty text", item["text"], "quote the text")
            setting: Any = _to_text(item["text"], f"{item_key}.text")
            if setting == "":
                raise _type_error(f"{item_key}.text", "non-empty text", setting)
        elif kind == "tokens":
            setting = to_word_list(item["tokens"], f"{item_key}.tokens")
            if not setting:
                raise _type_error(f"{item_key}.tokens", "a non-empty list of texts", item["tokens"])
        else:
            setting = item["chars"]
            if setting not in CHAR_CLASSES:
                raise _type_error(f"{item_key}.chars", "one of " + ", ".join(CHAR_CLASSES), setting)
        constraints.append({"position": position, kind: setting})
    return constraints


def check_template(template: str) -> str | None:
    """Return the problem with a task template, or None when it has {prompt} and {input} once each."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        return f"a template with balanced braces (write {{{{ and }}}} for literal braces; {error})"
    for name in fields:
        if name not in TEMPLATE_FIELDS:
            return f"a template whose only fields are {{prompt}} and {{input}}, not {{{name}}}"
    for name in TEMPLATE_FIELDS:
        if fields.count(name) != 1:
            return f"a template containing {{{name}}} exactly once"
    return None


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class FluencyConfig(_Validated):
    """Penalty on the prompt's own perplexity under the model, so the prompt reads as text."""

    _prefix: ClassVar[str] = "fluency"

    weight: float = _option(
        0.0,
        help="Weight of the prompt's mean negative log-likelihood (nats per token) under the "
        "model in the loss, where 0 turns the penalty off.",
        ge=0,
        example=0.1,
    )
    max_perplexity: float | None = _option(
        None,
        help="Success requires the discrete prompt's perplexity to be at most this, or null "
        "for no requirement. Every run reports the prompt perplexity either way.",
        gt=1,
        example=500.0,
    )


@dataclass
class EntropyConfig(_Validated):
    """Term on the entropy of the prompt's per-position token distributions."""

    _prefix: ClassVar[str] = "entropy"

    weight: float = _option(
        0.0,
        help="Weight of the mean entropy (nats) of the prompt's token distributions in the loss: "
        "positive sharpens them, negative spreads them out, 0 turns the term off. The term has "
        "no success check.",
        example=0.05,
    )


@dataclass
class KeywordsConfig(_Validated):
    """Words that the model's free-running output after the prompt must contain or avoid."""

    _prefix: ClassVar[str] = "keywords"

    require: list[str] = _option(
        help="Words or phrases that the greedy output must contain.",
        factory=list,
        convert=to_word_list,
        expected="a list of non-empty texts",
    )
    avoid: list[str] = _option(
        help="Words or phrases that the greedy output must not contain.",
        factory=list,
        convert=to_word_list,
        expected="a list of non-empty texts",
    )
    weight: float = _option(1.0, help="Weight of the keyword term in the loss.", ge=0)
    max_new_tokens: int = _option(
        16, help="Tokens generated after the prompt, in the loss and in the check.", ge=1
    )
    case_sensitive: bool = _option(
        False, help="Match the words with their case, instead of ignoring case."
    )


@dataclass
class TaskConfig(_Validated):
    """One prompt that makes the model map each example input to its output."""

    _prefix: ClassVar[str] = "task"

    examples: list[dict[str, str]] = _option(
        help="Examples as a list of {input: ..., output: ...} mappings.",
        factory=list,
        convert=_to_examples,
        expected="a list of mappings with the keys input and output",
    )
    path: str | None = _option(
        None,
        help="JSONL or CSV file of more examples with the fields input and output, read from "
        "the config file's folder when relative.",
        nonempty=True,
        example="data/examples.jsonl",
    )
    template: str = _option(
        "{prompt}\nInput: {input}\nOutput:",
        help="Text around the learnable prompt for each example: {prompt} marks the prompt "
        "and {input} the example input, each exactly once.",
        check=check_template,
    )
    output_prefix: str = _option(
        " ", help="Text placed between the filled template and the expected output."
    )
    weight: float = _option(1.0, help="Weight of the task term in the loss.", ge=0)
    loss: TaskLoss = _option(
        "cross_entropy",
        help="Loss on each output token: cross_entropy or margin (the hinge that objective.loss "
        "describes, with objective.margin).",
    )
    batch_size: int = _option(4, help="Training examples scored per optimization step.", ge=1)
    heldout: float = _option(
        0.25,
        help="Fraction of the examples held out from training (split with the run's seed) and "
        "scored only before and after the run.",
        ge=0,
        le=0.9,
    )
    min_accuracy: float = _option(
        1.0,
        help="Success requires at least this exact-match accuracy on the training examples.",
        gt=0,
        le=1,
    )
