"""Tests of the run configuration: schema checks, YAML loading, overrides and starter configs."""

from __future__ import annotations

import dataclasses
import doctest
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sdlm.config
from sdlm.config import (
    TEMPLATES,
    Config,
    ConfigError,
    EntropyConfig,
    EvalConfig,
    FluencyConfig,
    KeywordsConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimizerConfig,
    PromptConfig,
    SearchConfig,
    STGSConfig,
    TaskConfig,
    apply_overrides,
    config_from_dict,
    config_from_yaml,
    config_to_dict,
    dump_config,
    load_config,
    starter_config_yaml,
)

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {
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
TOP_LEVEL = ["seed", "output_dir", "run_name"]
BASE_YAML = "objective:\n  target: hello\n"


def write_config(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def yaml_with(key: str, value_text: str) -> tuple[str, int]:
    """Return YAML with a valid target plus `key: value_text`, and the line of that key."""
    if "." not in key:
        return f"{BASE_YAML}{key}: {value_text}\n", 3
    section, name = key.split(".")
    if section == "objective":
        # When the target itself is under test, target_ids keeps the objective complete.
        first = "  target_ids: [1]" if name == "target" else "  target: hello"
        return f"objective:\n{first}\n  {name}: {value_text}\n", 3
    return f"{BASE_YAML}{section}:\n  {name}: {value_text}\n", 4


def build_in_python(key: str, value):
    """Build the config object for `key = value` directly, with a valid target."""
    if "." not in key:
        return Config(objective=ObjectiveConfig(target="hello"), **{key: value})
    section, name = key.split(".")
    kwargs = {name: value}
    if section == "objective" and name == "target":
        kwargs["target_ids"] = [1]
    elif section == "objective":
        kwargs["target"] = "hello"
    return SECTIONS[section](**kwargs)


# ---------------------------------------------------------------------------------------------
# Defaults and the ConfigError format
# ---------------------------------------------------------------------------------------------


def test_defaults_valid_with_target():
    config = Config(objective=ObjectiveConfig(target="hello"))

    assert config.model == ModelConfig()
    assert config.prompt.length == 10
    assert config.optimizer.lr == 2.0
    assert config.objective.target == "hello"
    assert config.seed == 0


def test_defaults_without_target_rejected():
    with pytest.raises(ConfigError) as raised:
        Config()

    assert raised.value.key == "objective.target"
    assert "objective.target: missing" in str(raised.value)


def test_target_ids_alone_suffice():
    objective = ObjectiveConfig(target_ids=(5, "7", 9.0))

    assert objective.target_ids == [5, 7, 9]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ConfigError("m", source="a.yaml", line=3), "a.yaml:3: m"),
        (ConfigError("m", source="a.yaml"), "a.yaml: m"),
        (ConfigError("m", line=3), "line 3: m"),
        (ConfigError("m"), "m"),
        (ConfigError("first\nsecond", source="--set x=1"), "--set x=1: first second"),
    ],
)
def test_config_error_one_line_format(error, expected):
    assert str(error) == expected


def test_module_docstring_examples():
    result = doctest.testmod(sdlm.config)

    assert result.attempted > 0
    assert result.failed == 0


def test_config_module_imports_no_torch():
    # Load the module file on its own, because the package __init__ may import torch.
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('config_alone', {str(REPO / 'sdlm' / 'config.py')!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['config_alone'] = module\n"
        "spec.loader.exec_module(module)\n"
        "print('torch' in sys.modules)\n"
    )
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)

    assert output.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Bad values: one table, checked from YAML files and from Python
# ---------------------------------------------------------------------------------------------

# (dotted key, YAML value text, text the message must contain, key the error names if not key)
BAD_VALUES = [
    ("model.spec", '""', "non-empty text", None),
    ("model.device", "gpu", "expected auto, cpu, cuda, cuda:N or mps", None),
    ("model.device", "cuda:x", "expected auto, cpu, cuda, cuda:N or mps", None),
    ("model.device", "3", "expected auto, cpu, cuda, cuda:N or mps", None),
    ("model.dtype", "float64", "one of 'float32', 'bfloat16', 'float16'", None),
    ("model.trust_remote_code", "sure", "expected true or false", None),
    ("prompt.init_text", '""', "non-empty text or null", None),
    ("prompt.length", "0", "an integer >= 1", None),
    ("prompt.length", "2.5", "an integer >= 1", None),
    ("prompt.length", "ten", "an integer >= 1", None),
    ("prompt.length", "true", "an integer >= 1", None),
    ("prompt.init_scale", "0", "a number > 0", None),
    ("prompt.prefix", "null", 'use "" for empty text', None),
    ("prompt.suffix", "[a]", "expected text", None),
    ("prompt.vocab_mask", "all", "one of 'none'", None),
    ("prompt.samples", "0", "an integer >= 1", None),
    ("stgs.temperature", "0", "a number > 0", None),
    ("stgs.temperature", "-1", "a number > 0", None),
    ("stgs.temperature", ".inf", "a number > 0", None),
    ("stgs.learnable_temperature", "null", "one of 'none', 'scalar', 'per_position'", None),
    ("stgs.min_temperature", "0", "a number > 0", None),
    ("stgs.max_temperature", "-1", "a number > 0", None),
    ("stgs.hard", "maybe", "expected true or false", None),
    ("stgs.hard", "2", "expected true or false", None),
    ("stgs.hard", "1.0", "expected true or false", None),
    ("stgs.hard_method", "top", "one of 'argmax', 'categorical', 'nearest'", None),
    ("stgs.normalize", "l2", "one of 'none', 'center', 'zscore'", None),
    ("stgs.noise_scale", "-0.1", "a number >= 0", None),
    ("objective.type", "keywords", "one of 'target'", None),
    ("objective.target", '""', "non-empty text or null", None),
    ("objective.target", "[1, 2]", "expected text", None),
    ("objective.target_ids", "[]", "a non-empty list of token ids", None),
    ("objective.target_ids", "abc", "a non-empty list of token ids", None),
    ("objective.target_ids", "{a: 1}", "a non-empty list of token ids", None),
    ("objective.target_ids", "[1, -2]", "an integer >= 0", "objective.target_ids[1]"),
    ("objective.target_ids", "[1.5]", "an integer >= 0", "objective.target_ids[0]"),
    ("objective.target_ids", "[true]", "an integer >= 0", "objective.target_ids[0]"),
    ("objective.mode", "sampling", "one of 'teacher_forcing', 'generation'", None),
    ("optimizer.name", "adan", "did you mean 'adam'?", None),
    ("optimizer.lr", "-1", "a number > 0, got -1 (set optimizer.lr to a number > 0", None),
    ("optimizer.lr", "0", "a number > 0", None),
    ("optimizer.lr", "abc", "a number > 0, got 'abc'", None),
    ("optimizer.lr", "true", "a number > 0, got true", None),
    ("optimizer.lr", "null", "a number > 0, got null", None),
    ("optimizer.lr", ".nan", "a number > 0", None),
    ("optimizer.lr", "[0.1]", "a number > 0", None),
    ("optimizer.steps", "2.5", "an integer >= 1", None),
    ("optimizer.steps", "0", "an integer >= 1", None),
    ("optimizer.steps", '"many"', "an integer >= 1", None),
    ("optimizer.grad_clip", "0", "a number > 0 or null", None),
    ("optimizer.grad_clip", "-1", "a number > 0 or null", None),
    ("optimizer.temperature_schedule", "step", "one of 'constant'", None),
    ("optimizer.final_temperature", "0", "a number > 0 or null", None),
    ("eval.every", "0", "an integer >= 1", None),
    ("eval.stop_on_success", "perhaps", "expected true or false", None),
    ("seed", "-1", "an integer >= 0 and <= 4294967295", None),
    ("seed", "1.5", "an integer >= 0", None),
    ("seed", "4294967296", "an integer >= 0 and <= 4294967295", None),
    ("output_dir", '""', "non-empty text", None),
    ("run_name", "a/b", "a folder name without slashes", None),
    ("run_name", "..", "a folder name without slashes", None),
]


@pytest.mark.parametrize(("key", "value_text", "message", "error_key"), BAD_VALUES)
def test_bad_value_in_yaml_names_key_and_line(tmp_path, key, value_text, message, error_key):
    text, line = yaml_with(key, value_text)
    path = write_config(tmp_path, text)
    error_key = error_key or key

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    error = raised.value
    assert error.key == error_key
    assert error.line == line
    assert error.source == str(path)
    assert str(error).startswith(f"{path}:{line}: {error_key}: ")
    assert message in str(error)
    assert "\n" not in str(error)


@pytest.mark.parametrize(("key", "value_text", "message", "error_key"), BAD_VALUES)
def test_bad_value_in_python_names_key(key, value_text, message, error_key):
    value = yaml.safe_load(value_text)
    error_key = error_key or key

    with pytest.raises(ConfigError) as raised:
        build_in_python(key, value)

    assert raised.value.key == error_key
    assert str(raised.value).startswith(f"{error_key}: ")
    assert message in str(raised.value)


def test_exact_message_for_negative_lr(tmp_path):
    path = write_config(tmp_path, f"{BASE_YAML}optimizer:\n  lr: -1\n")

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert str(raised.value) == (
        f"{path}:4: optimizer.lr: expected a number > 0, got -1 "
        "(set optimizer.lr to a number > 0, such as 2.0)"
    )
    assert raised.value.value == -1


def test_validate_after_change_in_place():
    optimizer = OptimizerConfig()
    optimizer.lr = "2e-2"
    optimizer.validate()
    assert optimizer.lr == 0.02

    optimizer.steps = 0
    with pytest.raises(ConfigError, match=r"^optimizer\.steps: "):
        optimizer.validate()


# ---------------------------------------------------------------------------------------------
# Checks across fields
# ---------------------------------------------------------------------------------------------

# (YAML text, key the error names, its line, text the message must contain)
CROSS_FIELD_CASES = [
    (
        f"{BASE_YAML}stgs:\n  min_temperature: 20\n  max_temperature: 10\n",
        "stgs.min_temperature",
        4,
        "expected a value below stgs.max_temperature (10.0), got 20.0",
    ),
    (
        f"{BASE_YAML}stgs:\n  min_temperature: 1\n  max_temperature: 1\n",
        "stgs.min_temperature",
        4,
        "expected a value below stgs.max_temperature",
    ),
    (
        f"{BASE_YAML}stgs:\n  learnable_temperature: scalar\n  temperature: 20\n",
        "stgs.temperature",
        5,
        "because it is learnable, got 20.0",
    ),
    (
        f"{BASE_YAML}optimizer:\n  temperature_schedule: linear\n  final_temperature: 20\n",
        "optimizer.final_temperature",
        5,
        "because a temperature schedule is set",
    ),
    (
        f"{BASE_YAML}stgs:\n  temperature: 0.01\noptimizer:\n  temperature_schedule: cosine\n",
        "stgs.temperature",
        4,
        "because a temperature schedule is set",
    ),
    ("objective:\n  mode: generation\n", "objective.target", 1, "objective.target: missing"),
]


@pytest.mark.parametrize(("text", "key", "line", "message"), CROSS_FIELD_CASES)
def test_cross_field_check(tmp_path, text, key, line, message):
    path = write_config(tmp_path, text)

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert raised.value.key == key
    assert raised.value.line == line
    assert str(raised.value).startswith(f"{path}:{line}: ")
    assert message in str(raised.value)


def test_constant_schedule_ignores_temperature_bounds():
    config = Config(
        stgs=STGSConfig(temperature=50.0),
        objective=ObjectiveConfig(target="x"),
        optimizer=OptimizerConfig(final_temperature=50.0),
    )

    assert config.stgs.temperature == 50.0


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n", "model:\n  dtype: float16\n"])
def test_file_without_target_rejected(tmp_path, text):
    path = write_config(tmp_path, text)

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert raised.value.key == "objective.target"
    assert str(raised.value).startswith(f"{path}: objective.target: missing")


# ---------------------------------------------------------------------------------------------
# Conversions of what YAML 1.1 reads
# ---------------------------------------------------------------------------------------------

# (dotted key, YAML value text, expected Python value)
CONVERSIONS = [
    ("optimizer.lr", "1e-3", 0.001),
    ("stgs.temperature", "5e-1", 0.5),
    ("optimizer.lr", "1", 1.0),
    ("optimizer.lr", '"0.25"', 0.25),
    ("optimizer.grad_clip", "2", 2.0),
    ("optimizer.steps", "1e3", 1000),
    ("optimizer.steps", "300.0", 300),
    ("optimizer.steps", '"42"', 42),
    ("seed", "7.0", 7),
    ("stgs.hard", "yes", True),
    ("stgs.hard", "Off", False),
    ("stgs.hard", '"1"', True),
    ("stgs.hard", "0", False),
    ("stgs.hard", '"TRUE"', True),
    ("eval.stop_on_success", '"no"', False),
    ("optimizer.name", "Adam", "adam"),
    ("objective.target", "2022", "2022"),
    ("objective.target", "0x1F", "0x1F"),
    ("objective.target", "1_000", "1_000"),
    ("objective.target", "yes", "yes"),
    ("objective.target", "2022-01-01", "2022-01-01"),
    ("objective.target", "1:30", "1:30"),
    ("objective.target", "'0x1F'", "0x1F"),
    ("prompt.prefix", "3.10", "3.10"),
    ("run_name", "2022", "2022"),
    ("objective.target_ids", "[1, '2', 3.0]", [1, 2, 3]),
]


@pytest.mark.parametrize(("key", "value_text", "expected"), CONVERSIONS)
def test_yaml_value_converted(tmp_path, key, value_text, expected):
    text, _ = yaml_with(key, value_text)
    config = load_config(write_config(tmp_path, text))

    value = config_to_dict(config)
    for part in key.split("."):
        value = value[part]
    assert value == expected
    assert type(value) is type(expected)


def test_every_float_field_is_float(tmp_path):
    written = {
        "prompt.init_scale": "2",
        "stgs.temperature": "1",
        "stgs.min_temperature": "1e-1",
        "stgs.max_temperature": "10",
        "stgs.noise_scale": "0",
        "optimizer.lr": "1",
        "optimizer.grad_clip": "5e0",
        "optimizer.final_temperature": "1",
        "objective.margin": "2",
        "objective.weight": "1",
        "fluency.weight": "0",
        "fluency.max_perplexity": "100",
        "entropy.weight": "1",
        "keywords.weight": "1",
        "task.weight": "1",
        "task.heldout": "0",
        "task.min_accuracy": "1",
        "search.restart_bias": "3",
    }
    float_keys = {
        f"{section}.{field.name}"
        for section, cls in SECTIONS.items()
        for field in dataclasses.fields(cls)
        if typing.get_type_hints(cls)[field.name] in (float, float | None)
    }
    assert set(written) == float_keys
    lines = [BASE_YAML.rstrip("\n")]
    lines = ["objective:"]
    lines += [f"  {key.split('.')[1]}: {text}" for key, text in written.items() if key.startswith("objective.")]
    lines.append("  target: hello")
    for section in ("prompt", "stgs", "optimizer", "fluency", "entropy", "keywords", "task"):
        lines.append(f"{section}:")
        lines += [f"  {key.split('.')[1]}: {text}" for key, text in written.items() if key.startswith(section)]
    config = load_config(write_config(tmp_path, "\n".join(lines) + "\n"))

    for key in float_keys:
        section, name = key.split(".")
        assert type(getattr(getattr(config, section), name)) is float, key


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------

# (overrides, dotted key, expected value)
GOOD_OVERRIDES = [
    (["optimizer.lr=0.3"], "optimizer.lr", 0.3),
    (["optimizer.lr=1e-3"], "optimizer.lr", 0.001),
    (["stgs.hard=false"], "stgs.hard", False),
    (['objective.target="hello world"'], "objective.target", "hello world"),
    (["objective.target=hello world"], "objective.target", "hello world"),
    (["objective.target=2022"], "objective.target", "2022"),
    (["objective.target=a=b"], "objective.target", "a=b"),
    (["objective.target_ids=[1, 2, 3]"], "objective.target_ids", [1, 2, 3]),
    (["seed=5"], "seed", 5),
    (["run_name=null"], "run_name", None),
    (["optimizer.grad_clip="], "optimizer.grad_clip", None),
    (["optimizer.lr=0.1", "optimizer.lr=0.2"], "optimizer.lr", 0.2),
    ([" optimizer.steps =12"], "optimizer.steps", 12),
]


@pytest.mark.parametrize(("overrides", "key", "expected"), GOOD_OVERRIDES)
def test_override_applied(tmp_path, overrides, key, expected):
    path = write_config(tmp_path, f"{BASE_YAML}optimizer:\n  grad_clip: 1.0\n")

    config = load_config(path, overrides)

    value = config_to_dict(config)
    for part in key.split("."):
        value = value[part]
    assert value == expected
    assert type(value) is type(expected)


# (override, key the error names or None, text the message must contain)
BAD_OVERRIDES = [
    ("optimizer.lr", None, "expected KEY=VALUE, such as optimizer.lr=0.3"),
    ("=3", None, "expected KEY=VALUE"),
    ("optimizer.lrr=1", "optimizer.lrr", "unknown key 'optimizer.lrr' (did you mean 'optimizer.lr'?)"),
    ("optimzer.lr=1", "optimzer.lr", "unknown key 'optimzer.lr' (did you mean 'optimizer.lr'?)"),
    ("lr=1", "lr", "unknown key 'lr' (did you mean 'optimizer.lr'?)"),
    ("optimizer=1", "optimizer", "'optimizer' is a section"),
    ("optimizer.lr.x=1", "optimizer.lr.x", "unknown key 'optimizer.lr.x'"),
    ("optimizer.lr=abc", "optimizer.lr", "optimizer.lr: expected a number > 0, got 'abc'"),
    ("stgs.hard=maybe", "stgs.hard", "stgs.hard: expected true or false"),
    ("optimizer.lr=[1", "optimizer.lr", "invalid YAML value"),
    ("stgs.min_temperature=20", "stgs.min_temperature", "expected a value below"),
]


@pytest.mark.parametrize(("override", "key", "message"), BAD_OVERRIDES)
def test_bad_override_names_itself(tmp_path, override, key, message):
    path = write_config(tmp_path, BASE_YAML)

    with pytest.raises(ConfigError) as raised:
        load_config(path, [override])

    assert raised.value.key == key
    assert raised.value.source == f"--set {override}"
    assert raised.value.line is None
    assert str(raised.value).startswith(f"--set {override}: ")
    assert message in str(raised.value)


def test_override_fixes_bad_file_value(tmp_path):
    path = write_config(tmp_path, f"{BASE_YAML}optimizer:\n  lr: -1\n")

    config = load_config(path, ["optimizer.lr=0.1"])

    assert config.optimizer.lr == 0.1


def test_apply_overrides_copies_input():
    original = {"optimizer": {"lr": 0.5}}

    result = apply_overrides(original, ["optimizer.lr=0.1", "stgs.hard=no"])

    assert result == {"optimizer": {"lr": 0.1}, "stgs": {"hard": False}}
    assert original == {"optimizer": {"lr": 0.5}}


def test_apply_overrides_rejects_non_mapping_section():
    with pytest.raises(ConfigError) as raised:
        apply_overrides({"optimizer": 3}, ["optimizer.lr=0.1"])

    assert raised.value.key == "optimizer"


def test_apply_overrides_rejects_single_string():
    with pytest.raises(TypeError):
        apply_overrides({}, "optimizer.lr=0.1")


# ---------------------------------------------------------------------------------------------
# Keys, sections and malformed files
# ---------------------------------------------------------------------------------------------

# (YAML text, key the error names, its line, text the message must contain)
UNKNOWN_KEYS = [
    ("optimzer:\n  lr: 0.1\n", "optimzer", 1, "unknown key 'optimzer' (did you mean 'optimizer'?)"),
    (f"{BASE_YAML}optimizer:\n  lrr: 0.1\n", "optimizer.lrr", 4, "(did you mean 'optimizer.lr'?)"),
    (f"{BASE_YAML}prompt:\n  lr: 0.1\n", "prompt.lr", 4, "(did you mean 'optimizer.lr'?)"),
    (f"{BASE_YAML}lr: 0.1\n", "lr", 3, "unknown key 'lr' (did you mean 'optimizer.lr'?)"),
    (f"{BASE_YAML}zzz: 1\n", "zzz", 3, "unknown key 'zzz' (valid keys: model, prompt,"),
    (f"{BASE_YAML}model:\n  1: x\n", "model.1", 4, "unknown key 'model.1'"),
]


@pytest.mark.parametrize(("text", "key", "line", "message"), UNKNOWN_KEYS)
def test_unknown_key_suggests_fix(tmp_path, text, key, line, message):
    path = write_config(tmp_path, text)

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert raised.value.key == key
    assert raised.value.line == line
    assert str(raised.value).startswith(f"{path}:{line}: unknown key ")
    assert message in str(raised.value)


def test_unknown_key_exact_message(tmp_path):
    path = write_config(tmp_path, f"{BASE_YAML}optimzer:\n  lr: 0.1\n")

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert str(raised.value) == f"{path}:3: unknown key 'optimzer' (did you mean 'optimizer'?)"


@pytest.mark.parametrize("value_text", ["3", "[1, 2]", "adam", "true"])
def test_section_not_mapping_rejected(tmp_path, value_text):
    path = write_config(tmp_path, f"{BASE_YAML}optimizer: {value_text}\n")

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert raised.value.key == "optimizer"
    assert raised.value.line == 3
    assert "optimizer: expected a mapping of keys" in str(raised.value)


def test_empty_section_means_defaults(tmp_path):
    config = load_config(write_config(tmp_path, f"{BASE_YAML}optimizer:\n"))

    assert config.optimizer == OptimizerConfig()


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just text\n", "42\n"])
def test_top_level_not_mapping_rejected(tmp_path, text):
    path = write_config(tmp_path, text)

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert raised.value.line == 1
    assert "expected a mapping of sections" in str(raised.value)


# (YAML text, line of the error, text the message must contain)
MALFORMED_YAML = [
    ("optimizer:\n  lr: [0.1, 0.2\n", 3, "invalid YAML"),
    ("optimizer:\n\tlr: 0.1\n", 2, "invalid YAML"),
    ("objective:\n  target: 'unclosed\n", 3, "invalid YAML"),
    ("a: b: c\n", 1, "invalid YAML"),
    ("a: 1\n---\nb: 2\n", 2, "invalid YAML"),
    ("objective:\n  target: \x00\n", 2, "invalid YAML: unacceptable character #x0000"),
    ("objective:\n  target: !!python/name:os.system x\n", 2, "invalid YAML"),
    ("objective:\n  target: a\n  target: b\n", 3, "duplicate key 'objective.target' (first written on line 2"),
    ("objective:\n  target: a\nobjective:\n  mode: generation\n", 3, "duplicate key 'objective'"),
]


@pytest.mark.parametrize(("text", "line", "message"), MALFORMED_YAML)
def test_malformed_yaml_reports_line(tmp_path, text, line, message):
    path = write_config(tmp_path, text)

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert raised.value.line == line
    assert str(raised.value).startswith(f"{path}:{line}: ")
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_missing_file_rejected(tmp_path):
    path = tmp_path / "absent.yaml"

    with pytest.raises(ConfigError, match="config file not found") as raised:
        load_config(path)

    assert raised.value.source == str(path)


def test_directory_rejected(tmp_path):
    with pytest.raises(ConfigError, match="expected a YAML file, got a directory"):
        load_config(tmp_path)


def test_non_utf8_file_rejected(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("objective:\n  target: caf\xe9\n".encode("latin-1"))

    with pytest.raises(ConfigError, match="not UTF-8 text") as caught:
        load_config(path)
    assert caught.value.line == 2
    assert str(caught.value).endswith("byte 0xe9 is not UTF-8 text (invalid continuation byte); save the file as UTF-8")


# ---------------------------------------------------------------------------------------------
# Relative paths
# ---------------------------------------------------------------------------------------------


def test_output_dir_read_from_config_folder(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    path = write_config(folder, f"{BASE_YAML}output_dir: ../runs\n")

    config = load_config(path)

    assert config.output_dir == str(tmp_path / "runs")


def test_absolute_and_home_output_dir_kept(tmp_path):
    absolute = load_config(write_config(tmp_path, f"{BASE_YAML}output_dir: /srv/runs\n"))
    home = load_config(write_config(tmp_path, f"{BASE_YAML}output_dir: ~/runs\n"))

    assert absolute.output_dir == "/srv/runs"
    assert home.output_dir == str(Path("~/runs").expanduser())


@pytest.mark.parametrize(
    ("spec", "make", "expected"),
    [
        ("model.gguf", None, "{folder}/model.gguf"),
        ("../models/m.GGUF", None, "{root}/models/m.GGUF"),
        ("local_model", "dir", "{folder}/local_model"),
        ("weights/model.safetensors", "file", "{folder}/weights/model.safetensors"),
        ("HuggingFaceTB/SmolLM2-135M", None, "HuggingFaceTB/SmolLM2-135M"),
        ("smollm2", "dir", "smollm2"),
        ("/opt/models/m.gguf", None, "/opt/models/m.gguf"),
    ],
)
def test_model_spec_resolution(tmp_path, spec, make, expected):
    folder = tmp_path / "configs"
    folder.mkdir()
    if make == "dir":
        (folder / spec).mkdir(parents=True)
    if make == "file":
        (folder / spec).parent.mkdir(parents=True)
        (folder / spec).write_text("")
    path = write_config(folder, f"{BASE_YAML}model:\n  spec: {spec}\n")

    config = load_config(path)

    assert config.model.spec == expected.format(folder=folder, root=tmp_path)


def test_dict_without_base_dir_keeps_relative_paths():
    config = config_from_dict({"objective": {"target": "x"}, "model": {"spec": "m.gguf"}})

    assert config.output_dir == "runs"
    assert config.model.spec == "m.gguf"


# ---------------------------------------------------------------------------------------------
# Writing configs: dump, round trip, starter configs
# ---------------------------------------------------------------------------------------------

ROUND_TRIP_CONFIGS = [
    config_from_dict(TEMPLATES["quickstart"], base_dir="/srv/sdlm"),
    Config(
        model=ModelConfig(spec="/opt/models/m.gguf", device="cuda:1", dtype="bfloat16"),
        prompt=PromptConfig(
            init_text="é ü 中文 'quoted' \"double\"",
            prefix="0x1F",
            suffix="line1\nline2\r\x85 end  ",
            vocab_mask="ascii",
        ),
        stgs=STGSConfig(learnable_temperature="per_position", temperature=2.0, hard=False),
        objective=ObjectiveConfig(target="yes", target_ids=[1, 2, 3], mode="generation"),
        optimizer=OptimizerConfig(grad_clip=1e-7, temperature_schedule="cosine", final_temperature=0.1),
        eval=EvalConfig(every=1, stop_on_success=False),
        seed=2**32 - 1,
        output_dir="/tmp/sdlm runs",
        run_name="2022",
    ),
]


@pytest.mark.parametrize("config", ROUND_TRIP_CONFIGS)
def test_dump_then_load_round_trip(tmp_path, config):
    path = write_config(tmp_path, dump_config(config))

    loaded = load_config(path)

    assert loaded == config


def test_config_to_dict_plain_types():
    def check(value):
        if isinstance(value, dict):
            for item in value.values():
                check(item)
        elif isinstance(value, list):
            for item in value:
                check(item)
        else:
            assert value is None or type(value) in (str, int, float, bool), value

    data = config_to_dict(ROUND_TRIP_CONFIGS[1])

    check(data)
    assert list(data) == list(SECTIONS) + TOP_LEVEL


def test_committed_quickstart_matches_starter():
    path = REPO / "configs" / "quickstart.yaml"

    assert path.read_text(encoding="utf-8") == starter_config_yaml("quickstart")


def test_committed_quickstart_equals_template():
    path = REPO / "configs" / "quickstart.yaml"

    config = load_config(path)

    assert config == config_from_dict(TEMPLATES["quickstart"], base_dir=path.parent)
    assert config.objective.target == "\n\nThe ancient ones, who had been watching"
    assert config.prompt.length == 10
    assert config.optimizer.lr == 2.0
    assert config.optimizer.steps == 300
    assert config.eval.every == 10


def test_blank_starter_needs_only_a_target():
    text = starter_config_yaml("blank")

    with pytest.raises(ConfigError, match=r"objective\.target: missing"):
        config_from_yaml(text)
    config = config_from_yaml(text, overrides=["objective.target=x"])

    assert config == Config(objective=ObjectiveConfig(target="x"))


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_starter_documents_every_key(template):
    text = starter_config_yaml(template)
    comments = " ".join(line.strip()[2:] for line in text.splitlines() if line.strip().startswith("# "))
    data = yaml.safe_load(text)

    for name, cls in SECTIONS.items():
        assert list(data[name]) == [field.name for field in dataclasses.fields(cls)]
        for field in dataclasses.fields(cls):
            assert field.metadata["help"] in comments, f"{name}.{field.name}"
    for name in TOP_LEVEL:
        assert name in data
        assert Config.__dataclass_fields__[name].metadata["help"] in comments


def test_starter_unknown_template_rejected():
    with pytest.raises(ConfigError, match="unknown template 'fancy'"):
        starter_config_yaml("fancy")


@pytest.mark.parametrize("cls", [*SECTIONS.values(), Config])
def test_choice_help_names_every_choice(cls):
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if typing.get_origin(hints[field.name]) is typing.Literal:
            for choice in typing.get_args(hints[field.name]):
                assert choice in field.metadata["help"], f"{field.name}: {choice}"


# ---------------------------------------------------------------------------------------------
# Property tests: any input gives a Config or a one-line ConfigError, nothing else
# ---------------------------------------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(
        ["1e-3", "5e-1", "yes", "Off", "auto", "cuda:1", "adam", "none", "0x1F", "", "..", "a/b",
         "smollm2", "zscore", "generation", "scalar", "linear", "1e3", "nan", "-inf"]
    )
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def plausible_value(cls, field):
    """Values of the field's type, mostly valid, in the forms a YAML file or a user writes."""
    type_ = typing.get_type_hints(cls)[field.name]
    args = [arg for arg in typing.get_args(type_) if arg is not type(None)]
    optional = typing.get_origin(type_) in (typing.Union, types.UnionType)
    base = args[0] if optional else type_
    if field.name == "device":
        values = st.sampled_from(["auto", "cpu", "cuda", "cuda:3", "mps"])
    elif field.name == "run_name":
        values = st.from_regex(r"[A-Za-z0-9_-]{1,10}", fullmatch=True)
    elif base is float:
        values = st.floats(min_value=0.06, max_value=9.0) | st.sampled_from(["1e-1", "5e-1", 2, "2.5"])
    elif base is int:
        values = st.integers(min_value=1, max_value=10**6) | st.sampled_from(["1e3", 5.0, "12"])
    elif base is bool:
        values = st.booleans() | st.sampled_from(["yes", "off", "1", 0, "TRUE"])
    elif typing.get_origin(base) is typing.Literal:
        choices = st.sampled_from(typing.get_args(base))
        values = choices | choices.map(str.upper)
    elif base is str:
        values = st.text(min_size=1, max_size=12) | st.integers(0, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    else:
        values = st.lists(st.integers(0, 50_000) | st.just("7"), min_size=1, max_size=5)
    return st.none() | values if optional else values


def section_data(cls, junk):
    """Mappings of some of the section's keys; with junk, values may be anything and keys misspelled."""
    fields = {field.name: plausible_value(cls, field) for field in dataclasses.fields(cls)}
    if junk:
        fields = {name: values | VALUES for name, values in fields.items()}
        fields["typo"] = VALUES
    return st.fixed_dictionaries({}, optional=fields)


def config_data(junk):
    sections = {name: section_data(cls, junk) for name, cls in SECTIONS.items()}
    top_level = {name: plausible_value(Config, Config.__dataclass_fields__[name]) for name in TOP_LEVEL}
    objective = st.builds(
        lambda data, target: {**data, "target": target}, sections["objective"], st.text(min_size=1, max_size=12)
    )
    if not junk:
        optional = {name: values for name, values in sections.items() if name != "objective"}
        return st.fixed_dictionaries({"objective": objective}, optional={**optional, **top_level})
    sections = {name: values | VALUES for name, values in sections.items() if name != "objective"}
    top_level = {name: values | VALUES for name, values in top_level.items()}
    return st.builds(
        lambda known, unknown: {**unknown, **known},
        st.fixed_dictionaries({"objective": objective | VALUES}, optional={**sections, **top_level}),
        st.just({}) | st.dictionaries(st.text(max_size=6) | st.integers(), VALUES, max_size=1),
    )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config_data(junk=False))
def test_plausible_dict_round_trips(data):
    # Some combinations still fail a check across fields, such as min_temperature >= max_temperature.
    try:
        config = config_from_dict(data)
    except ConfigError as error:
        assert "\n" not in str(error)
        return

    assert config_from_yaml(dump_config(config)) == config


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config_data(junk=True))
def test_random_dict_gives_config_or_config_error(data):
    try:
        config_from_dict(data)
    except ConfigError as error:
        assert "\n" not in str(error)


OVERRIDES = st.lists(
    st.text(max_size=20)
    | st.builds(
        "{}.{}={}".format,
        st.sampled_from([*SECTIONS, "optimzer"]),
        st.sampled_from(["lr", "hard", "target", "target_ids", "spec", "length", "steps", "x"]),
        st.text(max_size=10),
    ),
    max_size=3,
)


@settings(max_examples=100, deadline=None)
@given(OVERRIDES)
def test_random_overrides_give_config_or_config_error(overrides):
    try:
        config_from_yaml(BASE_YAML, overrides=overrides)
    except ConfigError as error:
        assert "\n" not in str(error)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=60) | config_data(junk=True).map(lambda data: yaml.safe_dump(data, allow_unicode=True)))
def test_random_yaml_gives_config_or_config_error(text):
    try:
        config_from_yaml(text, "random.yaml")
    except ConfigError as error:
        assert "\n" not in str(error)
        assert str(error).startswith("random.yaml")
