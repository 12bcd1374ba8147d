"""The generation plan: manifest -> resolve -> [fetch inputs] -> the model family's stages (Kandinsky 2.2:
prior -> [hint] -> [MoVQ encode] -> decoder -> MoVQ) -> [CLIP score] -> encode images (CPU tasks).

The builder only describes the lazy Ray Data plan; nothing runs until the caller writes it.
"""

from __future__ import annotations

import logging
import os
import time

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
from kandinsky_engine.rows import ERROR_COLUMNS, object_column
from kandinsky_engine.stages.score import ClipScoreStage

from . import metrics
from .memory_fit import check_memory
from .reconcile import FilePlan
from .prepare import COMPUTE, CREATED, SPLITS, UNIT, prepare_units
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


def is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the allocator's RuntimeError on CPU."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


class Chunked:
    """Runs a stage on each unit of work in a block, in chunks of the stage's batch size.

    A unit (rows_per_block rows of one manifest file) is always split the same way, so a row
    shares its sub-batches with the same rows whatever Ray bundles together, and reruns give
    byte-identical images even though the batch shape changes float results on CPU.

    A chunk that raises (out of memory, or a row that makes the model fail) is split in halves and
    each half retried, down to single rows; a single row that still raises becomes a row error.
    OOM splits are counted in the `_oom_splits` column (on the first row of the split chunk). The
    seconds the stage spent on each unit, retries included, are added to `_compute_s` on the unit's
    first row (the writer records their sum per unit: `compute_s` in the shard records), and the
    time it finished the unit is set in `_created_at` on all its rows: after the last model stage,
    when the unit's images were made (the rows' `created_at`, see pipelines/sink.py).
    """

    def __init__(self, stage_class, batch_size: int, progress=None, **kwargs):
        started = time.perf_counter()
        self.stage = stage_class(**kwargs)
        self.name = stage_class.__name__
        self.batch_size = batch_size
        # Once per actor, in the worker's log (Ray's session logs; the console with --verbose).
        _actor_log().info("%s loaded in %.1f s (pid %d)", self.name, time.perf_counter() - started, os.getpid())
        if progress is not None:  # the run's CommitCounter: "loading models: k/n stages ready"; fire and forget
            progress.stage_loaded.remote(self.name)

    def __call__(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if UNIT not in block:  # an empty block (its unit was committed)
            return block
        units = block[UNIT]
        starts = [i for i in range(len(units)) if i == 0 or units[i] != units[i - 1]] + [len(units)]
        parts, seconds, finished = [], [], []
        for start, end in zip(starts, starts[1:]):
            began = time.perf_counter()
            parts += [self.run({k: v[i:min(i + self.batch_size, end)] for k, v in block.items()})
                      for i in range(start, end, self.batch_size)]
            seconds.append(time.perf_counter() - began)
            finished.append(time.time())
        if not parts:
            return block
        out = merge(parts)
        if COMPUTE in out:  # stages keep row count and order: the unit's rows are where they came in
            out[COMPUTE] = out[COMPUTE].astype(np.float64, copy=True)
            out[COMPUTE][starts[:-1]] += seconds  # this stage's seconds, on the unit's first row
            out[CREATED] = np.repeat(finished, np.diff(starts)).astype(np.float64)  # the last stage's stamp stays
        return out

    def run(self, chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Stages mark failed rows in place: a chunk retried after an exception starts clean.
        chunk = {k: v.copy() if k in ERROR_COLUMNS or k == SPLITS else v for k, v in chunk.items()}
        started = time.perf_counter()
        try:
            out = self.stage(chunk)
            metrics.stage_batch(self.name, time.perf_counter() - started)
            return out
        except Exception as exc:
            # Only text leaves this block: the exception's traceback holds the failed call's frames
            # and so its tensors, which must be gone before the retries (else empty_cache frees nothing).
            failure, oom = (type(exc).__name__, str(exc)), is_oom(exc)
        if oom:
            _release_memory()
            metrics.oom_split(self.name)
        n = len(chunk["id"])
        if n == 1:
            message = f"{'out of memory at batch size 1: ' if oom else ''}{failure[1]}"
            for name, value in zip(ERROR_COLUMNS, (self.name, failure[0], message[:2000])):
                chunk[name][0] = value
            # Stages pass failed rows through with empty outputs: run it again so that the row
            # carries the same columns as its batch-mates.
            try:
                return self.stage(chunk)
            except Exception:
                return chunk
        half = n // 2
        out = merge([self.run({k: v[a:b] for k, v in chunk.items()}) for a, b in ((0, half), (half, n))])
        if oom:
            out[SPLITS] = out[SPLITS].copy()
            out[SPLITS][0] += 1
        return out


class Fused:
    """Every model stage of the job in one actor: each stage wrapped in its own Chunked (its batch
    size, its OOM splitting), applied in order to the block. `stages`: [(stage class, batch size,
    constructor kwargs)]. torch's thread count is per process: the last stage's setting would win,
    so it is set once more from `threads`."""

    def __init__(self, stages: list, threads: int, progress=None, **kwargs):
        import torch

        self.stages = [Chunked(cls, batch_size, progress, **kwargs, **extra) for cls, batch_size, extra in stages]
        torch.set_num_threads(threads)

    def __call__(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for stage in self.stages:
            block = stage(block)
        return block


def fused_config(config: JobConfig, stages: list) -> JobConfig:
    """The config the stages of a fused actor see: every used stage scheduled as the decoder section
    (threads, GPU share, memory cap), each keeping its batch size."""
    scheduling = config.decoder.model_dump(exclude={"batch_size"})
    return config.model_copy(update={name: stage.model_copy(update=scheduling) for name, _, stage, _ in stages})


def _actor_log() -> logging.Logger:
    """The engine's logger in an actor process, which has no logging set up: INFO to stderr."""
    logger = logging.getLogger("kandinsky_engine")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return logger


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()  # tensors held by reference cycles of the failed call
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def merge(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate stage outputs (numpy batches with the same columns) in order."""
    return {k: arrow_friendly(concat([p[k] for p in parts])) for k in parts[0]}


def arrow_friendly(column: np.ndarray) -> np.ndarray:
    """Ray hands a list<struct> cell (the `mix` column) over as a numpy array of dicts, which it
    cannot turn back into Arrow (it would pickle the column); plain lists of dicts convert."""
    if column.dtype == object and any(isinstance(v, np.ndarray) and v.dtype == object for v in column):
        return object_column(list(v) if isinstance(v, np.ndarray) else v for v in column)
    return column


def concat(columns: list[np.ndarray]) -> np.ndarray:
    if any(c.dtype == object for c in columns):  # keep per-row objects (bytes, lists) as they are
        return object_column(v for c in columns for v in c)
    return np.concatenate(columns)


def pool_class(stage_class) -> type:
    """A Chunked subclass named after the stage (e.g. DecoderStagePool), so that each actor pool shows
    up under its own name in Ray's progress output and state API (`MapBatches(DecoderStagePool)`)
    instead of three indistinguishable `MapBatches(Chunked)`."""
    return type(f"{stage_class.__name__}Pool", (Chunked,), {"__doc__": Chunked.__doc__})


def stage_args(stage_class, stage: StageConfig, config: JobConfig, **stage_kwargs) -> dict:
    """`map_batches` arguments of one model stage: its own pool of resident actors, one block per call.
    Ray Data gives pool actors max_restarts=-1 and max_task_retries=-1 by default: a killed actor is
    restarted and the blocks it was working on are resubmitted (tests/test_faults.py)."""
    # Ray's own default unless the config pins it (`kandinsky-batch plan` pins the U-Net's at 2).
    in_flight = {"max_tasks_in_flight_per_actor": stage.max_tasks_in_flight} if stage.max_tasks_in_flight else {}
    return dict(
        fn_constructor_kwargs={"stage_class": stage_class, "batch_size": stage.batch_size, "config": config,
                               **stage_kwargs},
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


def build_generation(config: JobConfig, manifest: Manifest, plans: list[FilePlan], progress=None) -> Dataset:
    """The plan for the run's units (`plans`: per manifest file, which units, which rows). `progress`:
    the run's CommitCounter actor (pipelines/progress.py), told which stages load and when each has."""
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
    if progress is not None:
        progress.expect.remote([cls.__name__ for _, cls, _, _ in stages])
    # The MoVQ hands raw pixels on: they are encoded below, off the model actors.
    extra = lambda cls, kwargs: {**kwargs, "encode": False} if issubclass(cls, MovqStage) else kwargs  # noqa: E731
    if config.fuse_stages:
        fused = fused_config(config, stages)
        args = stage_args(None, config.decoder, fused)
        args["fn_constructor_kwargs"] = {
            "config": fused, "threads": config.decoder.threads(), "progress": progress,
            "stages": [(cls, stage.batch_size, extra(cls, kwargs)) for _, cls, stage, kwargs in stages]}
        ds = ds.map_batches(Fused, **args)
    else:
        for _, stage_class, stage, kwargs in stages:
            args = stage_args(stage_class, stage, config, **extra(stage_class, kwargs))
            args["fn_constructor_kwargs"]["progress"] = progress
            ds = ds.map_batches(pool_class(stage_class), **args)
    # Plain CPU tasks: an actor that holds a GPU never waits on zlib, and encoding scales with the
    # cluster's CPUs instead of the MoVQ pool's size.
    return ds.map_batches(encode_images, fn_kwargs={"output": config.output}, batch_size=None,
                          batch_format="numpy", num_cpus=IO_CPUS)
