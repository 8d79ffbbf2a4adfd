"""Strict conversion of plain YAML data into typed dataclasses.

Every recipe section is a dataclass. `build(cls, data)` checks the data against the
field types and raises `RecipeError` naming the offending key, the file it came
from and, for a typo, the closest valid key. Sections that can take several forms
(`loss`, data sources, evaluation sets) are told apart by an explicit `kind:` field: a union of
dataclasses, or a base class with a `registry` of kinds (`LossConfig`), to which each kind adds
itself where it is implemented.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

YAML_BOOLEANS = {False: ("no", "off", "false", "n"), True: ("yes", "on", "true", "y")}
"""Unquoted words YAML 1.1 reads as booleans: a choice spelled so is meant when a boolean comes."""


class RecipeError(ValueError):
    """A recipe could not be read: the message names the key and its source."""


class FieldError(ValueError):
    """Raised by a section's `__post_init__` for one of its fields.

    `field` is the key relative to the section (`lr`, `betas.1`, `train.0.weight`); the
    Builder prefixes the section's own key, so the message names e.g. `optimizer.lr`.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field
        self.message = message


def _suggest(word: str, options: typing.Iterable[str]) -> str:
    options = list(options)
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; valid: {', '.join(options)}" if options else ""


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def kind_of(cls: type) -> str:
    """The `kind` literal of a tagged dataclass."""
    hint = typing.get_type_hints(cls)["kind"]
    (value,) = get_args(hint)
    return value


def register_kind(cls: type) -> type:
    """Class decorator: makes the tagged dataclass `cls` a kind of the nearest base class that has
    its own `registry` (a `kind:` part of the recipe: training sources, evaluation sets)."""
    for base in cls.__mro__[1:]:
        if "registry" in base.__dict__:
            kind = kind_of(cls)
            if kind in base.registry:
                raise ValueError(f"{base.__name__} kind {kind!r} is registered twice")
            base.registry[kind] = cls
            return cls
    raise TypeError(f"{cls.__name__} has no base class with a registry of kinds")


class Builder:
    """Builds dataclasses from data; `source` names the file for error messages."""

    def __init__(self, source: str, overridden: set[str] | None = None) -> None:
        self.source = source
        self.overridden = overridden or set()

    def error(self, key: str, message: str) -> RecipeError:
        where = self.source
        if any(key == o or key.startswith(f"{o}.") for o in self.overridden):
            where += " (command-line override)"
        return RecipeError(f"{where}: '{key}': {message}")

    def build(self, tp: Any, value: Any, key: str) -> Any:
        if _is_union(tp):
            members = [a for a in get_args(tp) if a is not type(None)]
            if value is None:
                if type(None) in get_args(tp):
                    return None
                raise self.error(key, "must not be empty")
            if len(members) == 1:
                return self.build(members[0], value, key)
            if all(dataclasses.is_dataclass(m) for m in members):
                return self._build_tagged(members, value, key)
            raise TypeError(f"unsupported union in schema at {key}: {tp}")
        registry = getattr(tp, "registry", None) if isinstance(tp, type) else None
        if isinstance(registry, dict) and "registry" in tp.__dict__:  # a base class whose kinds register themselves
            if value is None:
                raise self.error(key, "must not be empty")
            return self._build_tagged(list(registry.values()), value, key)
        if dataclasses.is_dataclass(tp):
            return self._build_dataclass(tp, value, key)
        origin = get_origin(tp)
        if origin is Literal:
            choices = get_args(tp)
            if isinstance(value, bool):  # YAML reads an unquoted no/off/yes/on as a boolean
                spelled = [c for c in choices if isinstance(c, str) and c.lower() in YAML_BOOLEANS[value]]
                value = spelled[0] if len(spelled) == 1 else value
            if value not in choices:
                shown = repr(value)
                if isinstance(value, bool):  # the user wrote a word, not True/False
                    shown = f"{'/'.join(YAML_BOOLEANS[value][:3])} (read by YAML as {value})"
                raise self.error(key, f"{shown} is not one of {list(choices)}" + _suggest(str(value), map(str, choices)))
            return value
        if origin is list:
            (item_tp,) = get_args(tp)
            if not isinstance(value, list):
                raise self.error(key, f"expected a list, got {type(value).__name__} {value!r}")
            return [self.build(item_tp, v, f"{key}.{i}") for i, v in enumerate(value)]
        if origin is dict:
            key_tp, item_tp = get_args(tp)
            if not isinstance(value, dict):
                raise self.error(key, f"expected a mapping, got {type(value).__name__} {value!r}")
            return {str(k): self.build(item_tp, v, f"{key}.{k}") for k, v in value.items()}
        return self._build_scalar(tp, value, key)

    def _build_scalar(self, tp: Any, value: Any, key: str) -> Any:
        if value is None:
            raise self.error(key, f"must not be empty (expected {tp.__name__})")
        if tp is bool:
            if isinstance(value, bool):
                return value
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif tp is float:
            number = None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = value
            elif isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
                try:
                    number = float(value)
                except ValueError:
                    pass
            if number is not None:
                try:
                    number = float(number)
                except OverflowError:  # an integer too large for a float
                    number = math.inf
                if not math.isfinite(number):
                    # NaN and infinity pass every `<=` check and train to NaN weights.
                    raise self.error(key, f"must be a finite number, got {value!r}")
                return number
        elif tp is str:
            if isinstance(value, str):
                return value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
        else:
            raise TypeError(f"unsupported type in schema at {key}: {tp}")
        raise self.error(key, f"expected {tp.__name__}, got {type(value).__name__} {value!r}")

    def _build_tagged(self, members: list[type], value: Any, key: str) -> Any:
        by_kind = {kind_of(m): m for m in members}
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping with 'kind', got {value!r}")
        if "kind" not in value:
            raise self.error(key, f"missing 'kind' (one of {list(by_kind)})")
        kind = value["kind"]
        if kind not in by_kind:
            raise self.error(f"{key}.kind", f"unknown kind {kind!r}" + _suggest(str(kind), by_kind))
        return self._build_dataclass(by_kind[kind], value, key)

    def _build_dataclass(self, cls: type, value: Any, key: str) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.error(key or "<top>", f"expected a mapping, got {type(value).__name__} {value!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        prefix = f"{key}." if key else ""
        for name in value:
            if name not in fields:
                raise self.error(f"{prefix}{name}", "unknown key" + _suggest(str(name), fields))
        kwargs = {}
        for name, field in fields.items():
            if name in value:
                kwargs[name] = self.build(hints[name], value[name], f"{prefix}{name}")
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise self.error(f"{prefix}{name}", "required key is missing")
        try:
            return cls(**kwargs)
        except FieldError as exc:
            raise self.error(f"{prefix}{exc.field}", exc.message) from None
        except (ValueError, TypeError) as exc:
            raise self.error(key or "<top>", str(exc)) from None


def set_by_path(data: dict, dotted: str, value: Any) -> None:
    """Set `a.b.0.c` in nested dicts/lists, creating mappings where needed."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"override '{dotted}': '{part}' is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"override '{dotted}': '{'.'.join(parts[:i])}' is not a mapping")
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
