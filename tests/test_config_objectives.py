"""Tests of the config sections of the objective terms: values, errors with keys and lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdlm.config import (
    Config,
    ConfigError,
    KeywordsConfig,
    ObjectiveConfig,
    TaskConfig,
    apply_overrides,
    config_from_dict,
    config_from_yaml,
    dump_config,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_target_defaults_unchanged():
    objective = ObjectiveConfig(target="x")

    assert objective.loss == "cross_entropy"
    assert objective.margin == 1.0
    assert objective.weight == 1.0


def test_keywords_alone_suffice():
    config = Config(keywords=KeywordsConfig(require=["Paris", 2024]))

    assert config.keywords.require == ["Paris", "2024"]
    assert config.objective.target is None


def test_task_alone_suffices():
    config = Config(task=TaskConfig(examples=[{"input": "cat", "output": 7}]))

    assert config.task.examples == [{"input": "cat", "output": "7"}]


def test_nothing_to_optimize_names_every_option():
    with pytest.raises(ConfigError) as raised:
        Config()

    assert raised.value.key == "objective.target"
    for name in ("objective.target", "keywords.require", "task"):
        assert name in str(raised.value)


@pytest.mark.parametrize(
    ("text", "key", "line", "message"),
    [
        ("task:\n  examples: [{input: a, output: b}]\n  template: 'Input: {input}'\n", "task.template", 3, "{prompt} exactly once"),
        ("task:\n  examples: [{input: a, output: b}]\n  template: '{prompt} then'\n", "task.template", 3, "{input} exactly once"),
        ("task:\n  examples: [{input: a, output: b}]\n  template: '{prompt} {input} {other}'\n", "task.template", 3, "not {other}"),
        ("task:\n  examples: [{input: a, output: b}]\n  template: '{prompt} {input'\n", "task.template", 3, "balanced braces"),
        ("task:\n  examples: [{input: a, output: b}]\n  template: '{prompt}{prompt}{input}'\n", "task.template", 3, "{prompt} exactly once"),
        ("task:\n  examples:\n    - {input: a, output: b}\n    - {input: c}\n", "task.examples[1]", 4, "output: missing"),
        ("task:\n  examples:\n    - {input: a, output: b, note: c}\n", "task.examples[0]", 3, "unknown key 'note'"),
        ("task:\n  examples:\n    - just text\n", "task.examples[0]", 3, "a mapping with the keys input and output"),
        ("task:\n  examples: {input: a, output: b}\n", "task.examples", 2, "a list of mappings"),
        ("task:\n  examples: [{input: a, output: ' '}]\n", "task.examples[0].output", 2, "non-empty text"),
        ("task:\n  examples: [{input: a, output: b}]\n  heldout: 0.95\n", "task.heldout", 3, "<= 0.9"),
        ("task:\n  examples: [{input: a, output: b}]\n  loss: hinge\n", "task.loss", 3, "'cross_entropy', 'margin'"),
        ("keywords:\n  require: Paris\n", "keywords.require", 2, "a list of non-empty texts"),
        ("keywords:\n  require: [Paris, '']\n", "keywords.require[1]", 2, "non-empty text"),
        ("keywords:\n  avoid:\n    - x\n    - null\n", "keywords.avoid[1]", 4, "non-empty text"),
        ("keywords:\n  require: [a]\n  max_new_tokens: 0\n", "keywords.max_new_tokens", 3, ">= 1"),
        ("objective:\n  target: x\nprompt:\n  banned: [ok, 3, '']\n", "prompt.banned[2]", 4, "non-empty text"),
        ("objective:\n  target: x\nprompt:\n  banned_ids: [1, -2]\n", "prompt.banned_ids[1]", 4, "an integer >= 0"),
        ("task:\n  examples: [{input: a, output: b}]\nprompt:\n  chat: user\n", "prompt.chat", 4, "not supported with task"),
        ("objective:\n  target: x\nprompt:\n  chat_message: hi\n", "prompt.chat_message", 4, "only used with prompt.chat: system"),
        ("objective:\n  target: x\nprompt:\n  constraints:\n    - {position: 0, text: a, chars: alpha}\n", "prompt.constraints[0]", 5, "exactly one of text, tokens or chars"),
        ("objective:\n  target: x\nprompt:\n  constraints:\n    - {position: -1, text: a}\n", "prompt.constraints[0].position", 5, "an integer >= 0"),
        ("objective:\n  target: x\nprompt:\n  constraints:\n    - {position: 0, chars: letters}\n", "prompt.constraints[0].chars", 5, "one of alpha"),
        ("objective:\n  target: x\nprompt:\n  constraints:\n    - {position: 0, tokens: []}\n", "prompt.constraints[0].tokens", 5, "a non-empty list"),
        ("objective:\n  target: x\nprompt:\n  constraints:\n    - {position: 0, text: a, size: 2}\n", "prompt.constraints[0]", 5, "unknown key 'size'"),
        ("objective:\n  target: x\nmodel:\n  ensemble: smollm2\n", "model.ensemble", 4, "write model.ensemble as a YAML list"),
        ("objective:\n  target: x\n  loss: hinge\n", "objective.loss", 3, "'cross_entropy', 'margin', got 'hinge'"),
        ("objective:\n  target: x\n  margin: -1\n", "objective.margin", 3, ">= 0"),
        ("objective:\n  target: x\nfluency:\n  max_perplexity: 1\n", "fluency.max_perplexity", 4, "> 1"),
        ("objective:\n  target: x\nfluency:\n  weight: -1\n", "fluency.weight", 4, ">= 0"),
        ("objective:\n  target: x\nentropy:\n  weigth: 1\n", "entropy.weigth", 4, "did you mean 'entropy.weight'"),
    ],
)
def test_bad_values_name_key_and_line(tmp_path, text, key, line, message):
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert raised.value.key == key
    assert raised.value.line == line
    assert str(raised.value).startswith(f"{path}:{line}: ")
    assert message in str(raised.value)


def test_entropy_weight_may_be_negative():
    config = Config(objective=ObjectiveConfig(target="x"), entropy={"weight": -0.5})

    assert config.entropy.weight == -0.5


def test_ensemble_paths_read_from_config_folder(tmp_path):
    path = write(tmp_path, "objective:\n  target: x\nmodel:\n  ensemble: [models/b.gguf, smollm2]\n")

    config = load_config(path)

    assert config.model.ensemble == [str(tmp_path / "models" / "b.gguf"), "smollm2"]


def test_ensemble_dtype_suffix_kept_on_resolved_path(tmp_path):
    path = write(tmp_path, "objective:\n  target: x\nmodel:\n  ensemble: [models/b.gguf@bfloat16, smollm2@float16]\n")

    config = load_config(path)

    assert config.model.ensemble == [str(tmp_path / "models" / "b.gguf") + "@bfloat16", "smollm2@float16"]


@pytest.mark.parametrize(
    "entry, expected",
    [
        ("smollm2@bfloat16", ("smollm2", "bfloat16")),
        ("org/name@v2@float16", ("org/name@v2", "float16")),
        ("org/name@main", ("org/name@main", None)),
        ("@float16", ("@float16", None)),
        ("smollm2", ("smollm2", None)),
    ],
)
def test_split_dtype(entry, expected):
    from sdlm.config import split_dtype

    assert split_dtype(entry) == expected


def test_task_path_read_from_config_folder(tmp_path):
    path = write(tmp_path, "task:\n  path: data/words.jsonl\n")

    config = load_config(path)

    assert config.task.path == str(tmp_path / "data" / "words.jsonl")


def test_overrides_set_lists():
    data = apply_overrides({}, ["keywords.require=[Paris, London]", "task.template='{prompt} {input} =>'"])

    config = config_from_dict(data)

    assert config.keywords.require == ["Paris", "London"]
    assert config.task.template == "{prompt} {input} =>"


def test_round_trip_with_examples():
    config = Config(
        keywords=KeywordsConfig(require=["a: b", "yes"], avoid=["x"]),
        task=TaskConfig(examples=[{"input": "1\n2", "output": "{x}"}], template="{input}\n{prompt}"),
    )

    assert config_from_yaml(dump_config(config)) == config


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_committed_configs_load(name):
    config = load_config(REPO / "configs" / name)

    assert isinstance(config, Config)
    if config.task.path is not None:
        assert Path(config.task.path).exists()
