"""Run configuration: YAML loading, ``--set`` overrides, validation and starter files.

A config is a tree of dataclasses, one per YAML section, defined in `sdlm.config_sections` and
re-exported here. Each field has a type, a default, a one-line help text and a check. The
checks run in ``__post_init__``, so a config built in Python is validated and normalized
exactly like one read from YAML. Every problem raises ConfigError with a one-line message that
names the file, line, key, rejected value and fix.

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
    sdlm.config_fields.ConfigError: optimizer.lr: expected a number > 0, got -1 (set optimizer.lr to a number > 0, such as 2.0)

This module must not import torch, because the CLI imports it to validate configs quickly.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

# The sections and their checks live in config_sections; this module reads and writes them as
# YAML, and re-exports them so that `from sdlm.config import Config` keeps working.
from sdlm.config_sections import (
    _SECTIONS,
    _TOP_LEVEL_FIELDS,
    EMBEDDED_MODEL,
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
    _field_names,
    _is_text_field,
    _locate,
    _section_error,
    _top_level_error,
    _unknown_key_error,
    config_from_dict,
    split_dtype,
)

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
    "split_dtype",
    "starter_config_yaml",
]


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
        line = error.object[: error.start].count(b"\n") + 1
        raise ConfigError(
            f"byte {error.object[error.start]:#04x} is not UTF-8 text ({error.reason}); save the file as UTF-8",
            source=source,
            line=line,
        ) from None
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
    # From seeds 0-4 on a 2-core CPU it took 10-100 steps (4-52 s) to a prompt that also works as text.
    "quickstart": {
        "prompt": {"length": 10},
        "objective": {"target": "\n\nThe ancient ones, who had been watching", "mode": "teacher_forcing"},
        "optimizer": {"steps": 300},
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
