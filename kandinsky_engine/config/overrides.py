"""`--set a.b=value` overrides, each value parsed against the type of the field it sets."""

from __future__ import annotations

import json
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from ..config_errors import ConfigError, unknown_key
from .job import JobConfig



def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings to a nested dict, each value parsed against the type of the
    JobConfig field it sets (see `parse_value`). Every bad item is one line of the ConfigError raised."""
    problems = []
    for item in overrides:
        try:
            _apply_override(data, item)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(problems)
    return data


def _apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects key.sub=value, got {item!r}")
    parts = key.split(".")
    value = parse_value(key, raw, _field_type(key, parts))
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: {part!r} is not a section")
    node[parts[-1]] = value


def _field_type(key: str, parts: list[str]):
    """The type annotation of the JobConfig field at `parts` (Any below a free-form dict such as
    storage_options)."""
    annotation = JobConfig
    for depth, part in enumerate(parts):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if part not in annotation.model_fields:
                raise ValueError(f"--set {key}: {unknown_key(part, annotation.model_fields, JobConfig)}")
            annotation = annotation.model_fields[part].annotation
        elif annotation is dict or get_origin(annotation) is dict:
            annotation = (get_args(annotation) or (str, Any))[1]
        elif annotation is not Any:
            raise ValueError(f"--set {key}: {'.'.join(parts[:depth])} is a value, not a section")
    return annotation


def _members(annotation) -> tuple:
    """The types of a union (`int | None` -> (int, NoneType)), or the type itself."""
    return get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)


def _admits_str(annotation) -> bool:
    return any(t is str or (get_origin(t) is Literal and any(isinstance(v, str) for v in get_args(t)))
               for t in _members(annotation))


def _is_collection(annotation) -> bool:
    return any((get_origin(t) or t) in (dict, list) or (isinstance(t, type) and issubclass(t, BaseModel))
               for t in _members(annotation))


# What each scalar type accepts on the command line (JSON scalars), for the check and its message.
_SCALARS = {bool: ("true or false", lambda v: isinstance(v, bool)),
            int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
            float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
            type(None): ("null", lambda v: v is None)}


def _json_scalar(raw: str):
    def refuse(name):  # NaN and Infinity: Python's json accepts them, JSON does not
        raise ValueError(name)

    return json.loads(raw, parse_constant=refuse)


def parse_value(key: str, raw: str, annotation):
    """A `--set` value, parsed against its field's type instead of by YAML 1.1's guesses (which make
    `no` a boolean and `2024-01-01` a date):
    - a field whose type admits a string gets `raw` exactly (`defaults.negative_prompt=no` is "no");
    - a dict, list or section gets YAML flow syntax (`storage_options={s3: {anon: true}}`, `[a, b]`);
    - a bool, int or float field gets a JSON scalar of its type (true/false only for a bool, never
      yes/no/on/off; null where the field is optional);
    - a key inside a free-form dict (`storage_options.s3.anon`) gets a JSON scalar if `raw` is one,
      else the string.
    """
    if annotation is Any:
        if raw.lstrip()[:1] in ("{", "["):
            return yaml.safe_load(raw)
        try:
            return _json_scalar(raw)
        except ValueError:
            return raw
    if _admits_str(annotation):
        return raw
    if _is_collection(annotation):
        value = yaml.safe_load(raw)
        if not isinstance(value, (dict, list)):
            raise ValueError(f"--set {key}={raw}: expected YAML flow syntax, e.g. [a, b] or {{a: 1}}")
        return value
    accepted = [_SCALARS[t] for t in _members(annotation) if t in _SCALARS]
    if not accepted:  # a type without a command-line form here: pydantic says what it takes
        return raw
    try:
        value = _json_scalar(raw)
    except ValueError:
        value = ...  # matches nothing below
    if not any(fits(value) for _, fits in accepted):
        raise ValueError(f"--set {key}={raw}: expected {' or '.join(name for name, _ in accepted)}")
    return value
