"""Loading a job config: YAML, overrides, validation, relative paths."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from ..config_errors import from_validation, read_yaml
from .job import JobConfig
from .overrides import apply_overrides



def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> JobConfig:
    """Read YAML, apply overrides, validate. Relative local paths resolve against the YAML's folder."""
    path = Path(path)
    cfg = validate(apply_overrides(read_yaml(path), list(overrides)), str(path), overrides)
    return resolve_paths(cfg, path.resolve().parent)


def validate(data: dict, where: str, overrides=()) -> JobConfig:
    """A JobConfig from `data`; pydantic's errors become one line per key (config_errors)."""
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:  # one line per key, not pydantic's dump
        raise from_validation(exc, JobConfig, where, {o.partition("=")[0] for o in overrides}) from None


def resolve_paths(cfg: JobConfig, base: Path) -> JobConfig:
    """`cfg` with its relative local paths (manifest, allowed prefixes, output, model folders)
    taken from `base` (a config file's folder; the current folder for configs given in code)."""
    cfg.input.manifest = resolve_local(cfg.input.manifest, base)
    cfg.input.allowed_uri_prefixes = [resolve_local(p, base) for p in cfg.input.allowed_uri_prefixes]
    cfg.output.path = resolve_local(cfg.output.path, base)
    for field in ("prior", "decoder"):
        value = getattr(cfg.model, field)
        if value.startswith((".", "/")):
            setattr(cfg.model, field, resolve_local(value, base))
    return cfg


def resolve_local(value: str, base: Path) -> str:
    if "://" in value or Path(value).is_absolute():
        return value
    return str((base / value).resolve())
