"""The generation plan: manifest -> resolve -> [fetch inputs] -> the model family's stages (Kandinsky 2.2:
prior -> [hint] -> [MoVQ encode] -> decoder -> MoVQ) -> [CLIP score] -> encode images (CPU tasks).

The builder only describes the lazy Ray Data plan; nothing runs until the caller writes it.
"""

from __future__ import annotations

import uuid

import numpy as np
import ray
from ray.data import ActorPoolStrategy, Dataset

from kandinsky_engine.config import JobConfig
from kandinsky_engine.columns import passthrough_fields
from kandinsky_engine.config import StageConfig
from kandinsky_engine.device import check_devices
from kandinsky_engine.families import family_for
from kandinsky_engine.inputs import FETCH_TASKS, fetch_inputs
from kandinsky_engine.manifest import Manifest
from kandinsky_engine.stages.movq import MovqStage, encode_images
from kandinsky_engine.rows import ERROR_COLUMNS
from kandinsky_engine.stages.score import ClipScoreStage

from .chunked import Chunked, Fused, concat, is_fatal_device_error, is_oom, merge  # noqa: F401 (re-exported)
from .memory_fit import check_memory
from .reconcile import FilePlan
from .prepare import prepare_units
from .read import ManifestUnits

# Reading, resolving and writing are light; giving them a fraction of a CPU keeps them
# schedulable when the model actors hold every whole CPU of a small machine.
IO_CPUS = 0.25
# A unit must reach the writer as one block (see ShardSink.write); Ray Data splits map outputs
# above this size, so it is raised from Ray's 128 MiB default to fit large units of big images.
MAX_BLOCK_BYTES = 1 << 30


def light_step(fn):
    """A plain (Ray task) step that never fails the job: if `fn` raises on a batch, the batch's
    rows are marked failed with the reason and go to errors/ (the model stages pass them through)."""

    def step(batch: dict[str, np.ndarray], **kwargs) -> dict[str, np.ndarray]:
        try:
            return fn(batch, **kwargs)
        except Exception as exc:
            out = {**batch, **{name: batch[name].copy() for name in ERROR_COLUMNS}}
            for i in range(len(out["id"])):
                if not out["error_message"][i]:
                    out["error_stage"][i], out["error_type"][i] = fn.__name__, type(exc).__name__
                    out["error_message"][i] = str(exc)[:2000]
            return out

    step.__name__ = step.__qualname__ = fn.__name__  # Ray names the operator after it
    return step


def fused_config(config: JobConfig, stages: list) -> JobConfig:
    """The config the stages of a fused actor see: every used stage scheduled as the decoder section
    (threads, GPU share, memory cap), each keeping its batch size."""
    scheduling = config.decoder.model_dump(exclude={"batch_size"})
    return config.model_copy(update={name: stage.model_copy(update=scheduling) for name, _, stage, _ in stages})


def pool_class(stage_class) -> type:
    """A Chunked subclass named after the stage (e.g. DecoderStagePool), so that each actor pool shows
    up under its own name in Ray's progress output and state API (`MapBatches(DecoderStagePool)`)
    instead of three indistinguishable `MapBatches(Chunked)`."""
    return type(f"{stage_class.__name__}Pool", (Chunked,), {"__doc__": Chunked.__doc__})


def stage_args(stage_class, stage: StageConfig, config: JobConfig, fatal_scope: str | None = None,
               **stage_kwargs) -> dict:
    """`map_batches` arguments of one model stage: its own pool of resident actors, one block per call.
    Ray Data gives pool actors max_restarts=-1 and max_task_retries=-1 by default: a killed actor is
    restarted and the blocks it was working on are resubmitted (tests/test_faults.py); an actor whose
    CUDA context broke exits to be restarted so (`fatal_scope`: the plan's crash ledger, pipelines/chunked.py)."""
    # Ray's own default unless the config pins it (`kandinsky-batch plan` pins the U-Net's at 2).
    in_flight = {"max_tasks_in_flight_per_actor": stage.max_tasks_in_flight} if stage.max_tasks_in_flight else {}
    return dict(
        fn_constructor_kwargs={"stage_class": stage_class, "batch_size": stage.batch_size, "config": config,
                               "fatal_scope": fatal_scope, **stage_kwargs},
        batch_size=None,  # the whole block: see Chunked
        batch_format="numpy",
        compute=ActorPoolStrategy(size=stage.actors, **in_flight),
        num_cpus=stage.num_cpus,
        num_gpus=stage.num_gpus,
    )


def model_stages(config: JobConfig, manifest: Manifest) -> list[tuple[str, type, StageConfig, dict]]:
    """The actor stages of this job, in order: its model family's, for the tasks its rows run, then CLIP
    scoring (on the decoded pixels) when output.columns asks for clip_score.
    (section name, stage class, the section's StageConfig, constructor kwargs)."""
    family = family_for(config)
    clip = {"image_embeds", "clip_score"} & set(config.output.columns)
    if clip and "prior" not in family.parts:  # both come from the prior's CLIP encoders
        raise ValueError(f"output.columns {sorted(clip)}: {family.title} has no CLIP prior to compute them with")
    stages = [(name, cls, getattr(config, name), kwargs) for name, cls, kwargs in family.stages(config, manifest.tasks)]
    if "clip_score" in config.output.columns:
        stages.append(("score", ClipScoreStage, config.score, {}))
    return stages


def check_resources(config: JobConfig, manifest: Manifest, cluster: dict) -> None:
    """Refuse plans that Ray Data cannot schedule, instead of letting them hang.

    Actor pools hold their CPUs for the whole run, and Ray Data's file listing and read tasks
    need one whole CPU besides (measured on Ray 2.60: three actor pools reserving 1.5 of 2 CPUs
    stall silently). So the actors may reserve at most (cluster CPUs - 1). A CUDA device must suit
    every stage's num_gpus (device.check_devices), and each actor's estimated GPU memory its cap
    (memory_fit.check_memory).
    """
    stages = {name: stage for name, _, stage, _ in model_stages(config, manifest)}
    used = list(stages)
    if config.fuse_stages:  # one pool, scheduled by the decoder section
        stages = {"decoder": config.decoder}
    check_devices(config, list(stages))
    check_memory(config, used, cluster)  # each actor's estimated GPU memory against its cap
    cpus = sum(s.num_cpus * s.actors for s in stages.values())
    gpus = sum(s.num_gpus * s.actors for s in stages.values())
    have_cpus, have_gpus = cluster.get("CPU", 0), cluster.get("GPU", 0)
    tolerance = 1e-9  # sums of fractions: 0.2 + 0.4 + 0.3 + 0.1 is 1.0000000000000002
    if cpus > have_cpus - 1 + tolerance:
        detail = ", ".join(f"{n} {s.actors}x{s.num_cpus}" for n, s in stages.items())
        raise ValueError(
            f"stage actors reserve {cpus:g} CPUs ({detail}) but the Ray cluster has {have_cpus:g}; "
            f"keep the total at or below {have_cpus - 1:g} (one CPU stays free for reading and writing). "
            "num_cpus is a scheduling share: torch threads are set by torch_threads."
        )
    if gpus > have_gpus + tolerance:
        raise ValueError(f"stage actors reserve {gpus:g} GPUs but the Ray cluster has {have_gpus:g}")


def build_generation(config: JobConfig, manifest: Manifest, plans: list[FilePlan], sources: dict,
                     progress=None) -> Dataset:
    """The plan for the run's units (`plans`: per manifest file, which units, which rows). `sources`: the
    model sources as the driver resolved them (models.resolve_sources), which every stage loads from.
    `progress`: the run's CommitCounter actor (pipelines/progress.py), told which stages load and when each has."""
    source = ManifestUnits(plans, config.rows_per_block(), config.storage_options)
    ds = ray.data.read_datasource(source, num_cpus=IO_CPUS, override_num_blocks=len(source.get_read_tasks(-1)))
    # A unit must reach the writer whole (see ShardSink.write); Ray splits blocks above this size.
    ds.context.target_max_block_size = max(ds.context.target_max_block_size or 0, MAX_BLOCK_BYTES)
    prepare_args = {"row_errors": manifest.row_errors, "defaults": config.defaults,
                    "passthrough": passthrough_fields(manifest.schema)}
    ds = ds.map_batches(prepare_units, fn_kwargs=prepare_args, batch_size=None, batch_format="pyarrow", num_cpus=IO_CPUS)
    if manifest.tasks & set(FETCH_TASKS):
        ds = ds.map_batches(light_step(fetch_inputs), fn_kwargs={"config": config, "manifest_file": manifest.files[0].path},
                            batch_format="numpy", num_cpus=IO_CPUS)
    stages = model_stages(config, manifest)
    scope = uuid.uuid4().hex  # this plan's crash ledger: chunks that broke an actor's CUDA context
    if progress is not None:
        progress.expect.remote([cls.__name__ for _, cls, _, _ in stages])
    # The MoVQ hands raw pixels on: they are encoded below, off the model actors.
    extra = lambda cls, kwargs: {**kwargs, "encode": False} if issubclass(cls, MovqStage) else kwargs  # noqa: E731
    stages = [(name, cls, stage, {**kwargs, "sources": sources}) for name, cls, stage, kwargs in stages]
    if config.fuse_stages:
        fused = fused_config(config, stages)
        args = stage_args(None, config.decoder, fused)
        args["fn_constructor_kwargs"] = {
            "config": fused, "threads": config.decoder.threads(), "fatal_scope": scope, "progress": progress,
            "stages": [(cls, stage.batch_size, extra(cls, kwargs)) for _, cls, stage, kwargs in stages]}
        ds = ds.map_batches(Fused, **args)
    else:
        for _, stage_class, stage, kwargs in stages:
            args = stage_args(stage_class, stage, config, fatal_scope=scope, **extra(stage_class, kwargs))
            args["fn_constructor_kwargs"]["progress"] = progress
            ds = ds.map_batches(pool_class(stage_class), **args)
    # Plain CPU tasks: an actor that holds a GPU never waits on zlib, and encoding scales with the
    # cluster's CPUs instead of the MoVQ pool's size.
    return ds.map_batches(encode_images, fn_kwargs={"output": config.output}, batch_size=None,
                          batch_format="numpy", num_cpus=IO_CPUS)
