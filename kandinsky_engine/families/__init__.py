"""Model families: what each Kandinsky generation is to the engine, one short module each.

A family names its weights (the `model.*` fields it reads), the diffusers pipelines that select it,
the tasks its weights can run, the model stages a job of those tasks needs (in order), the
generation defaults of its diffusers pipelines, and its tiny offline model. The job builder
(pipelines/generate.py) appends the family's stages; no stage asks which family it is in.

Adding a family: a package here with a `FAMILY` in its `__init__.py` and its tiny builder in
`tiny.py`, one line in `_registry()` below, and its stage classes in `kandinsky_engine/stages/`
(or reused from there).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import GenerationDefaults, JobConfig, ModelConfig
from ..device import resolve_auto
from ..sampling import SCHEDULERS

# (config section, stage class, constructor kwargs): one model stage of a job, in plan order.
StagePlan = tuple[str, type, dict]


@dataclass(frozen=True)
class Family:
    name: str  # the value of model.family
    title: str  # for people: "Kandinsky 2.2"
    pipelines: tuple[str, ...]  # `_class_name`s of model.decoder's model_index.json that select it
    parts: tuple[str, ...]  # the ModelConfig fields holding its weights, e.g. ("prior", "decoder", "depth")
    tasks: Callable[[ModelConfig, dict | None], tuple[str, ...]]  # what the configured weights can run
    stages: Callable[[JobConfig, set[str]], list[StagePlan]]  # the model stages for these tasks, in order
    write_tiny: Callable[[Path], None]  # writes its tiny model directories under the shared tiny root
    defaults: dict = field(default_factory=dict)  # GenerationDefaults its pipelines change (unless set)
    task_defaults: dict = field(default_factory=dict)  # {task: {field: value}}: per-task defaults (unless set)
    # The JobConfig stage sections its stages are scheduled by (their batch sizes and threads enter
    # the run's fingerprint).
    sections: tuple[str, ...] = ("prior", "hint", "encode", "decoder", "movq")
    schedulers: tuple[str, ...] = tuple(SCHEDULERS)  # the values of defaults.scheduler its decoder runs

    def used_parts(self, model: ModelConfig, storage_options: dict | None = None) -> tuple[str, ...]:
        """The parts a job with these weights reads (and fingerprints, pins, names in its rows): all of
        them, but a depth estimator only with a decoder that runs ControlNet rows."""
        return tuple(p for p in self.parts if p != "depth" or "controlnet" in self.tasks(model, storage_options))


def _registry() -> dict[str, Family]:
    from . import kandinsky3, kandinsky20, kandinsky21, kandinsky22

    return {f.name: f for f in (kandinsky22.FAMILY, kandinsky21.FAMILY, kandinsky3.FAMILY, kandinsky20.FAMILY)}


FAMILIES = _registry()


def _register_tiny() -> None:
    from ..models import use_tiny_model
    from .tiny import ensure_tiny_model

    use_tiny_model(ensure_tiny_model)


_register_tiny()


def pipeline_class(model: ModelConfig, storage_options: dict | None = None) -> str | None:
    """`_class_name` of model.decoder's model_index.json (only that file is read)."""
    from ..model_cache import is_remote, read_json
    from ..models import resolve_source

    if is_remote(model.decoder):
        return read_json(model.decoder, "model_index.json", storage_options).get("_class_name")
    source = resolve_source(model.decoder, "decoder", model.cache_dir, weights=False)
    index = Path(source) / "model_index.json"
    if index.exists():
        return json.loads(index.read_text()).get("_class_name")
    from diffusers import DiffusionPipeline  # a hub id

    return DiffusionPipeline.load_config(source).get("_class_name")


def family_of(model: ModelConfig, storage_options: dict | None = None) -> Family:
    """model.family, or the family whose pipelines include model.decoder's `_class_name`."""
    if model.family != "auto":
        if model.family not in FAMILIES:
            raise ValueError(f"model.family={model.family!r}: not one of {['auto', *FAMILIES]}")
        return FAMILIES[model.family]
    name = pipeline_class(model, storage_options)
    for family in FAMILIES.values():
        if name in family.pipelines:
            return family
    known = {f.name: list(f.pipelines) for f in FAMILIES.values()}
    raise ValueError(f"model.decoder {model.decoder!r} is a {name!r} pipeline, which no model family runs "
                     f"(families and their pipelines: {known}); set model.family to choose one")


def family_for(config: JobConfig) -> Family:
    """The family of a config that `resolve_family` produced (or that names one): no file is read."""
    if config.model.family in FAMILIES:
        return FAMILIES[config.model.family]
    return family_of(config.model, config.storage_options)


def resolve_family(config: JobConfig) -> tuple[JobConfig, Family]:
    """The job's family and its config as the stages see it (see with_family)."""
    family = family_of(config.model, config.storage_options)
    return with_family(config, family), family


def with_family(config: JobConfig, family: Family) -> JobConfig:
    """`config` with model.family resolved and the family's defaults filled in where the job's config
    does not set them (a manifest column still overrides per row)."""
    given = config.defaults.model_fields_set
    update = {k: v for k, v in family.defaults.items() if k not in given}
    tasks = {task: {k: v for k, v in fields.items() if k not in given} for task, fields in family.task_defaults.items()}
    if tasks and "task_defaults" not in given:
        update["task_defaults"] = {t: f for t, f in tasks.items() if f}
    defaults = GenerationDefaults.model_validate({**config.defaults.model_dump(), **update})
    defaults.__pydantic_fields_set__ = set(given)  # what the user set stays what the user set
    if defaults.scheduler not in family.schedulers:
        raise ValueError(f"defaults.scheduler={defaults.scheduler!r}: {family.title} runs {list(family.schedulers)}")
    config = resolve_auto(config)  # device and dtype, as every actor and the fingerprint take them
    model = config.model.model_copy(update={"family": family.name})
    return config.model_copy(update={"model": model, "defaults": defaults})


def supported_tasks(model: ModelConfig, storage_options: dict | None = None) -> tuple[str, ...]:
    """The tasks the configured weights can run (reads small config files only)."""
    return family_of(model, storage_options).tasks(model, storage_options)
