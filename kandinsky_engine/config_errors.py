"""Config problems as one line each, `section.key: problem (did you mean X?)`, instead of pydantic's
dump (which repeats the input dict and links its documentation for every error).

`load_config` (config.py) reads YAML through `read_yaml` and turns a pydantic ValidationError into a
ConfigError through `from_validation`; `--set` problems are collected the same way. Suggestions come
from difflib: a close field name in the same section, else the same or a close name in another
section (`batch_size` at the top level: `did you mean decoder.batch_size?`). Values are shown
shortened and with URL credentials masked; nothing under `storage_options` is shown at all.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from .storage import redact_url

SECRET_SECTIONS = ("storage_options",)  # values below these keys are never echoed


class ConfigError(ValueError):
    """Problems with a job config, one line each. `str()` is what the CLI prints after `error: `:
    the one problem, or a count and the problems indented below it."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems, self.source = list(problems), source
        where = f"{source}: " if source else ""
        if len(self.problems) == 1:
            text = where + self.problems[0]
        else:
            text = f"{where}{len(self.problems)} problems in the config\n  " + "\n  ".join(self.problems)
        super().__init__(text)


def read_yaml(path: Path) -> dict:
    """The config file as a dict: a missing file, a YAML syntax error (with its line and column) or
    a top level that is not a mapping is a one-line ConfigError naming the file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(["no such file"], str(path)) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read it: {type(exc).__name__}: {exc}"], str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError([f"invalid YAML: {problem}"], where) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"invalid YAML: {exc}"], str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"expected a mapping of sections (input:, output:, ...) at the top level, "
                           f"got {_shown(data)}"], str(path))
    return data


# -- unknown keys --------------------------------------------------------------------------------

def unknown_key(name: str, fields, root: type[BaseModel] | None = None) -> str:
    """`unknown key (did you mean X?)`: X a close name among `fields` (the section's keys), else a
    key of that name (or a close one) in another section of `root`; else the section's keys."""
    fields = list(fields)
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean {close[0]}?)"
    elsewhere = _all_keys(root) if root is not None else []
    same = [path for path in elsewhere if path.rsplit(".", 1)[-1] == name]
    if not same:
        leaves = sorted({path.rsplit(".", 1)[-1] for path in elsewhere})
        near = difflib.get_close_matches(name, leaves, n=1, cutoff=0.75)
        same = [path for path in elsewhere if near and path.rsplit(".", 1)[-1] == near[0]]
    if len(same) > 2:  # batch_size: every stage section has one
        return f"unknown key here ({same[0].rsplit('.', 1)[-1]} is a key of " \
               f"{', '.join(path.rsplit('.', 1)[0] for path in same)})"
    if same:
        return f"unknown key (did you mean {' or '.join(same)}?)"
    return f"unknown key (known: {', '.join(fields)})"


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of every field of `model` and of its sections, in declaration order."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        section = _unwrap(field.annotation)
        if _is_model(section):
            keys += _all_keys(section, f"{prefix}{name}.")
    return keys


# -- pydantic's errors ---------------------------------------------------------------------------

def from_validation(exc: ValidationError, model: type[BaseModel], source: str | None = None,
                    overridden: set[str] = frozenset()) -> ConfigError:
    """One line per key that pydantic refused (errors of one key, e.g. each member of an
    `int | float` union, become one line). `overridden`: keys given with --set, marked so."""
    by_key: dict[str, list[str]] = {}
    for error in exc.errors():
        key, owner = _walk(model, error["loc"])
        problem = _problem(error, key, owner, model)
        problems = by_key.setdefault(key, [])
        if problem not in problems:
            problems.append(problem)
    lines = []
    for key, problems in by_key.items():
        set_here = any(key == k or key.startswith(k + ".") for k in overridden)
        lines.append(f"{key or 'the config'}{' (--set)' if set_here else ''}: {_merge(problems)}")
    return ConfigError(lines, source)


def _problem(error: dict, key: str, owner, model) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    got = "" if key.split(".")[0] in SECRET_SECTIONS else f", got {_shown(value)}"
    if kind == "extra_forbidden":
        return unknown_key(key.rsplit(".", 1)[-1], owner.model_fields if owner else [], model)
    if kind == "missing":
        return "required, but not set"
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.6)
        if error["loc"][-1] == "[key]":  # a key of a mapping whose keys are fixed (task_defaults' tasks)
            return f"unknown key (did you mean {close[0]}?)" if close else f"unknown key (expected {ctx.get('expected')})"
        return f"expected {ctx.get('expected')}{got}" + (f" (did you mean {close[0]}?)" if close else "")
    bound = {"greater_than_equal": ("at least", "ge"), "greater_than": ("above", "gt"),
             "less_than_equal": ("at most", "le"), "less_than": ("below", "lt")}.get(kind)
    if bound:
        return f"must be {bound[0]} {ctx.get(bound[1])}{got}"
    expected = EXPECTED.get(kind)
    if expected:
        return f"expected {expected}{got}"
    if kind in ("value_error", "assertion_error"):
        return re.sub(r"^(Value|Assertion) error, ", "", error["msg"])
    return f"{error['msg']}{got}"


# What a value of the wrong type should have been, by pydantic error type.
EXPECTED = {
    **dict.fromkeys(("int_parsing", "int_type", "int_from_float", "int_parsing_size"), "an integer"),
    **dict.fromkeys(("float_parsing", "float_type", "finite_number"), "a number"),
    **dict.fromkeys(("bool_parsing", "bool_type"), "true or false"),
    **dict.fromkeys(("string_type", "string_unicode"), "a string"),
    **dict.fromkeys(("model_type", "model_attributes_type", "dict_type"), "a mapping (key: value lines)"),
    **dict.fromkeys(("list_type", "tuple_type"), "a list"),
}


def _merge(problems: list[str]) -> str:
    """`expected an integer, got 'x'` + `expected a number, got 'x'` -> `expected an integer or a number, got 'x'`."""
    typed = [re.fullmatch(r"expected (.*?)(, got .*)?", p) for p in problems]
    if len(problems) > 1 and all(typed) and len({m.group(2) for m in typed}) == 1:
        return f"expected {' or '.join(m.group(1) for m in typed)}{typed[0].group(2) or ''}"
    return "; ".join(problems)


def _walk(model: type[BaseModel], loc: tuple) -> tuple[str, type[BaseModel] | None]:
    """(dotted key of `loc`, the section whose field its last part names). pydantic's loc also holds
    a union member's tag (`int`, `float`) and `[key]` for a mapping's key: neither is a key."""
    parts: list[str] = []
    node: Any = model
    owner = None
    for part in loc:
        node = _unwrap(node)
        if _is_model(node):
            owner, field = node, node.model_fields.get(part)
            parts.append(str(part))
            node = field.annotation if field else None
        elif node is dict or get_origin(node) is dict:
            owner = None
            if part != "[key]":
                parts.append(str(part))
                node = (get_args(node) or (str, Any))[1]
        elif get_origin(node) in (list, tuple):
            owner = None
            parts[-1] += f"[{part}]"
            node = (get_args(node) or (Any,))[0]
        elif node is Any:  # below a free-form mapping (storage_options.s3.anon): keys all the way
            parts.append(str(part))
        else:  # a union member's tag (`int`, `float`): the key is complete
            break
    return ".".join(parts), owner


def _unwrap(annotation):
    """X of `X | None`; other unions stay as they are."""
    if get_origin(annotation) in (Union, UnionType):
        members = [t for t in get_args(annotation) if t is not type(None)]
        return members[0] if len(members) == 1 else annotation
    return annotation


def _is_model(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _shown(value) -> str:
    """A value for a message: short, URL credentials masked, a whole section by its kind."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null (empty)"
    text = repr(redact_url(value) if isinstance(value, str) else value)
    return text if len(text) <= 60 else text[:57] + "..."
