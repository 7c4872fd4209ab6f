"""Field declarations, value conversions and checks shared by every config section.

A section is a dataclass that derives from _Validated and declares each field with _option:
a type, a default, a one-line help text and a check. sdlm.config builds the run config from
these sections; sdlm.config_objectives adds the sections of the extra objective terms.

This module must not import torch, because the CLI imports the config to validate it quickly.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal, Union

class ConfigError(ValueError):
    """Invalid configuration file, key or value.

    Attributes:
        message: the text after the location, e.g. "optimizer.lr: expected a number > 0, ...".
        key: dotted key of the rejected setting, such as "optimizer.lr", or None.
        line: 1-based line in the YAML file, or None.
        source: the file path, "--set KEY=VALUE" for a command-line override, or None.
        value: the rejected value, or None when there is none.
        related_keys: other keys involved in a cross-field check.

    ``str(error)`` is one line: "SOURCE:LINE: MESSAGE", with absent parts left out.
    """

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        line: int | None = None,
        source: str | None = None,
        value: Any = None,
        related_keys: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.key = key
        self.line = line
        self.source = source
        self.value = value
        self.related_keys = tuple(related_keys)

    def __str__(self) -> str:
        location = self.source or ""
        if self.line is not None:
            location = f"{location}:{self.line}" if location else f"line {self.line}"
        text = f"{location}: {self.message}" if location else self.message
        return " ".join(text.splitlines())


# ---------------------------------------------------------------------------------------------
# Field declarations and checks
# ---------------------------------------------------------------------------------------------


def _option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    factory: Callable[[], Any] | None = None,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
    nonempty: bool = False,
    check: Callable[[str], str | None] | None = None,
    example: Any = None,
    convert: Callable[[Any, str], Any] | None = None,
    expected: str | None = None,
) -> Any:
    """Declare a config field with its help text and its check.

    gt, ge and le bound a number. nonempty rejects "". check receives a validated string and
    returns the problem ("expected ...") or None. example is shown in the fix of an error
    message in place of the default. convert(value, key) validates a value of a type that the
    generic checks do not know, such as a list of texts, and returns it in canonical form. It
    raises ConfigError. expected describes that type in error messages.
    """
    metadata = {
        "help": help,
        "gt": gt,
        "ge": ge,
        "le": le,
        "nonempty": nonempty,
        "check": check,
        "example": example,
        "convert": convert,
        "expected": expected,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _check_device(device: str) -> str | None:
    if re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", device):
        return None
    return "expected auto, cpu, cuda, cuda:N or mps"


def _check_run_name(name: str) -> str | None:
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        return "expected a folder name without slashes, or null"
    return None


def _show(value: Any) -> str:
    """Format a value for an error message as YAML users read it, truncated to one short line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_optional(type_: Any) -> tuple[Any, bool]:
    """Split ``X | None`` into (X, True), and any other type into (type_, False)."""
    if typing.get_origin(type_) in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(type_) if arg is not type(None)]
        if len(args) == 1:
            return args[0], True
    return type_, False


def _describe_bounds(meta: Mapping[str, Any]) -> str:
    bounds = []
    if meta.get("gt") is not None:
        bounds.append(f"> {meta['gt']}")
    if meta.get("ge") is not None:
        bounds.append(f">= {meta['ge']}")
    if meta.get("le") is not None:
        bounds.append(f"<= {meta['le']}")
    return " and ".join(bounds)


def _type_error(key: str, expected: str, value: Any, fix: str | None = None) -> ConfigError:
    message = f"{key}: expected {expected}, got {_show(value)}"
    if fix:
        message += f" ({fix})"
    return ConfigError(message, key=key, value=value)


def _to_number(value: Any, key: str, expected: str, fix: str) -> float:
    """Convert an int, float or numeric string (YAML reads 1e-3 as a string) to a finite float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _type_error(key, expected, value, fix)
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise _type_error(key, expected, value, fix) from None
    if not math.isfinite(number):
        raise _type_error(key, expected, value, fix)
    return number


def _to_integer(value: Any, key: str, expected: str, fix: str) -> int:
    """Convert an int, an integer-valued float or an integer string ("1e3" too) to an int."""
    if isinstance(value, bool):
        raise _type_error(key, expected, value, fix)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    number = _to_number(value, key, expected, fix)
    if not number.is_integer():
        raise _type_error(key, expected, value, fix)
    return int(number)


_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})


def _to_bool(value: Any, key: str, expected: str = "true or false") -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise _type_error(key, expected, value)


def _to_choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    """Match a string against a Literal's choices, ignoring case and surrounding spaces."""
    expected = "one of " + ", ".join(repr(choice) for choice in choices)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in choices:
            return word
        close = difflib.get_close_matches(word, choices, n=1)
        if close:
            raise _type_error(key, expected, value, f"did you mean {close[0]!r}?")
    raise _type_error(key, expected, value)


def _to_text(value: Any, key: str) -> str:
    # A number is read back as text: `target: 2022` means the text "2022". load_config and
    # apply_overrides restore the text as written, so this only matters for Python dicts.
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _type_error(key, "text", value, f"quote the value of {key}")


def _to_token_ids(value: Any, key: str) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise _type_error(key, "a non-empty list of token ids (integers >= 0)", value)
    token_ids = []
    for index, item in enumerate(value):
        item_key = f"{key}[{index}]"
        token_id = _to_integer(item, item_key, "an integer >= 0", "token ids are integers >= 0")
        if token_id < 0:
            raise _type_error(item_key, "an integer >= 0", item, "token ids are integers >= 0")
        token_ids.append(token_id)
    return token_ids


def _check_bounds(
    number: float, value: Any, key: str, expected: str, fix: str, meta: Mapping
) -> None:
    """Raise unless number is within the field's bounds; value is what the user wrote."""
    too_low = (meta["gt"] is not None and not number > meta["gt"]) or (
        meta["ge"] is not None and not number >= meta["ge"]
    )
    too_high = meta["le"] is not None and not number <= meta["le"]
    if too_low or too_high:
        raise _type_error(key, expected, number if isinstance(value, str) else value, fix)


def _coerce(
    value: Any,
    type_: Any,
    key: str,
    meta: Mapping[str, Any],
    default: Any,
    build_section: Callable[[type, Any, str], Any] | None = None,
) -> Any:
    """Validate one field value and return it in its canonical Python type.

    build_section(cls, data, key) turns a mapping into a nested section. The config that contains
    sections provides it.

    Raises ConfigError naming ``key`` when the value has the wrong type or fails the check.
    """
    base, optional = _is_optional(type_)

    # Sections: a mapping becomes the section object, and null means an empty section.
    if isinstance(base, type) and issubclass(base, _Validated):
        if isinstance(value, base):
            value.validate()
            return value
        if value is None:
            value = {}
        if build_section is None:
            raise TypeError(f"config field {key} is a section, but its owner cannot build sections")
        return build_section(base, value, key)

    expected = _describe_type(base, meta) + (" or null" if optional else "")
    example = meta["example"] if meta["example"] is not None else default
    fix = f"set {key} to {_describe_type(base, meta)}, such as {_show(example)}"
    if value is None:
        if optional:
            return None
        raise _type_error(key, expected, value, 'use "" for empty text' if base is str else fix)

    if meta.get("convert") is not None:
        return meta["convert"](value, key)
    if base is float:
        number = _to_number(value, key, expected, fix)
        _check_bounds(number, value, key, expected, fix, meta)
        return number
    if base is int:
        integer = _to_integer(value, key, expected, fix)
        _check_bounds(integer, value, key, expected, fix, meta)
        return integer
    if base is bool:
        return _to_bool(value, key, expected)
    if typing.get_origin(base) is Literal:
        return _to_choice(value, key, typing.get_args(base))
    if base is str:
        text = _to_text(value, key)
        if meta["nonempty"] and text == "":
            fix = f"set {key} to null instead" if optional else None
            raise _type_error(key, expected, text, fix)
        problem = meta["check"](text) if meta["check"] else None
        if problem:
            raise _type_error(key, problem.removeprefix("expected "), text)
        return text
    if base == list[int]:
        return _to_token_ids(value, key)
    raise TypeError(f"config field {key} has an unsupported type {base!r}")


def _describe_type(base: Any, meta: Mapping[str, Any]) -> str:
    if meta.get("expected"):
        return meta["expected"]
    bounds = _describe_bounds(meta)
    if base is float:
        return f"a number {bounds}" if bounds else "a number"
    if base is int:
        return f"an integer {bounds}" if bounds else "an integer"
    if base is bool:
        return "true or false"
    if typing.get_origin(base) is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(base))
    if base is str:
        return "non-empty text" if meta["nonempty"] else "text"
    return "a list of token ids (integers >= 0)"


_TYPE_HINTS: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    if cls not in _TYPE_HINTS:
        _TYPE_HINTS[cls] = typing.get_type_hints(cls)
    return _TYPE_HINTS[cls]


def _field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return None
    return field.default


class _Validated:
    """Base of the config dataclasses: validates and normalizes every field on creation."""

    # Dotted prefix of this section's keys in error messages ("" for the top level).
    _prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field, convert it to its canonical type, then run the cross-field checks.

        Construction calls this. Call it again after changing a field in place.
        Raises ConfigError naming the first invalid key.
        """
        types_by_name = _field_types(type(self))
        for field in dataclasses.fields(self):
            key = f"{self._prefix}.{field.name}" if self._prefix else field.name
            value = _coerce(
                getattr(self, field.name),
                types_by_name[field.name],
                key,
                field.metadata,
                _field_default(field),
                self._build_section,
            )
            setattr(self, field.name, value)
        self._check_fields_together()

    def _check_fields_together(self) -> None:
        """Run the checks that involve several fields, after each field passed its own."""

    # A config that contains sections sets this to a function (cls, data, key) -> section.
    _build_section: ClassVar[Callable[[type, Any, str], Any] | None] = None
