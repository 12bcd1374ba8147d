"""A model stage applied to blocks of units, chunk by chunk, with its failures contained.

No Ray here (jobs/bench_gpu.py runs it on a GPU box without Ray). pipelines/generate.py wraps these
classes in Ray Data actor pools.

Failures, by kind:
- out of memory (CUDA's OutOfMemoryError, the CPU allocator's error): the chunk is split in halves,
  each retried, down to one row; counted in `_oom_splits`;
- a fatal device error (any other CUDA error: an illegal address, a device-side assert, cuBLAS or
  cuDNN failing to execute): the process's CUDA context is unusable after it, so nothing in this
  process is retried. Under Ray (`fatal_scope` set) the actor records the chunk in a crash ledger and
  exits; Ray restarts it (max_restarts=-1) and resubmits the block (max_task_retries=-1). A chunk
  that killed its actor FATAL_LIMIT times is split in halves on the next attempt, and a single row
  that did becomes a row error without running again, so a deterministic fault ends in row errors,
  never in an endless restart loop. Without `fatal_scope` the error is raised;
- anything else (a row that makes the model raise): split in halves down to the row, which becomes
  a row error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from kandinsky_engine.rows import ERROR_COLUMNS, object_column

from . import metrics
from .prepare import COMPUTE, CREATED, SPLITS, UNIT

# A chunk that killed its actor this many times with a fatal device error is split (a row: failed).
FATAL_LIMIT = 2
# The process exit status of an actor that stops after a fatal device error (EX_SOFTWARE).
FATAL_EXIT = 70
# cuBLAS / cuDNN statuses that mean the kernel failed on the device (the context is suspect after
# them); their other statuses (not supported, bad parameter) are ordinary errors.
FATAL_STATUSES = ("CUBLAS_STATUS_EXECUTION_FAILED", "CUBLAS_STATUS_INTERNAL_ERROR", "CUBLAS_STATUS_MAPPING_ERROR",
                  "CUDNN_STATUS_EXECUTION_FAILED", "CUDNN_STATUS_INTERNAL_ERROR", "CUDNN_STATUS_MAPPING_ERROR")


def is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, cuBLAS failing to allocate its workspace, or the CPU allocator's error."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                           or "cublas_status_alloc_failed" in text))


def is_fatal_device_error(exc: BaseException) -> bool:
    """A CUDA error other than out of memory. torch raises `torch.AcceleratorError` for CUDA runtime
    errors (an illegal memory access, a device-side assert); older builds and the libraries raise a
    RuntimeError whose text names the error."""
    if is_oom(exc):
        return False
    if type(exc).__name__ == "AcceleratorError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "CUDA error" in text or "device-side assert" in text or any(status in text for status in FATAL_STATUSES))


class CrashLedger:
    """How many times each chunk (a stage and its rows' ids) killed its actor, in files on the node: a
    restarted actor is a new process. `scope` names the job's plan (pipelines/generate.py draws one per
    build), so that two jobs with the same ids never share counts. A restarted actor that lands on
    another node starts counting there again: the bound is per node."""

    def __init__(self, scope: str, root: str | None = None):
        self.folder = Path(root or tempfile.gettempdir()) / "kandinsky-engine-fatal" / scope

    @staticmethod
    def key(stage: str, ids) -> str:
        return hashlib.sha256("\0".join([stage, *map(str, ids)]).encode()).hexdigest()[:32]

    def crashes(self, key: str) -> tuple[int, str]:
        """(times recorded, the last error message)."""
        try:
            lines = (self.folder / key).read_text().splitlines()
        except FileNotFoundError:
            return 0, ""
        return len(lines), lines[-1] if lines else ""

    def record(self, key: str, message: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / key, "a") as f:  # one line per crash; appends of a line are atomic
            f.write(" ".join(message.split())[:500] + "\n")
            f.flush()
            os.fsync(f.fileno())


def _exit_for_restart(name: str, message: str) -> None:
    """Stop this actor process at once: its CUDA context is broken, and Ray restarts a dead actor
    (never one whose method raised). os._exit skips the atexit handlers that would touch CUDA."""
    _actor_log().error("%s: fatal device error, exiting (status %d) so that Ray restarts this actor: %s",
                       name, FATAL_EXIT, message[:500])
    for handler in logging.getLogger("kandinsky_engine").handlers:
        handler.flush()
    os._exit(FATAL_EXIT)


class Chunked:
    """Runs a stage on each unit of work in a block, in chunks of the stage's batch size.

    A unit (rows_per_block rows of one manifest file) is always split the same way, so a row
    shares its sub-batches with the same rows whatever Ray bundles together, and reruns give
    byte-identical images even though the batch shape changes float results on CPU.

    A chunk that raises is handled by the kind of failure (module docstring): out of memory and a
    row that makes the model raise are split in halves down to single rows (a single row that still
    raises becomes a row error); a fatal device error stops the actor (`fatal_scope` set) or raises.
    OOM splits are counted in the `_oom_splits` column (on the first row of the split chunk). The
    seconds the stage spent on each unit, retries included, are added to `_compute_s` on the unit's
    first row (the writer records their sum per unit: `compute_s` in the shard records), and the
    time it finished the unit is set in `_created_at` on all its rows: after the last model stage,
    when the unit's images were made (the rows' `created_at`, see pipelines/sink.py).

    A stage with a `prefetch(chunk)` method is told about the next chunk before the current one
    runs, so that it prepares that chunk's inputs (the decoders draw its noise on a background
    thread) while the device works on this one.
    """

    exit_for_restart = staticmethod(_exit_for_restart)  # tests replace it: it ends the process

    def __init__(self, stage_class, batch_size: int, fatal_scope: str | None = None, progress=None, **kwargs):
        started = time.perf_counter()
        self.stage = stage_class(**kwargs)
        self.name = stage_class.__name__
        self.batch_size = batch_size
        self.ledger = CrashLedger(fatal_scope) if fatal_scope else None
        # Once per actor, in the worker's log (Ray's session logs; the console with --verbose).
        _actor_log().info("%s loaded in %.1f s (pid %d)", self.name, time.perf_counter() - started, os.getpid())
        if progress is not None:  # the run's CommitCounter: "loading models: k/n stages ready"; fire and forget
            progress.stage_loaded.remote(self.name)

    @classmethod
    def wrapping(cls, stage, batch_size: int) -> Chunked:
        """A Chunked around a stage object built elsewhere (jobs/bench_gpu.py), without a crash ledger."""
        self = cls.__new__(cls)
        self.stage, self.name, self.batch_size, self.ledger = stage, type(stage).__name__, batch_size, None
        return self

    def __call__(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if UNIT not in block:  # an empty block (its unit was committed)
            return block
        units = block[UNIT]
        starts = [i for i in range(len(units)) if i == 0 or units[i] != units[i - 1]] + [len(units)]
        chunks = [(u, {k: v[a:b] for k, v in block.items()}) for u, (start, end) in enumerate(zip(starts, starts[1:]))
                  for a, b in ((i, min(i + self.batch_size, end)) for i in range(start, end, self.batch_size))]
        parts, seconds, finished = [], [0.0] * (len(starts) - 1), [0.0] * (len(starts) - 1)
        for k, (unit, chunk) in enumerate(chunks):
            for _, ahead in chunks[k : k + 2] if k == 0 else chunks[k + 1 : k + 2]:
                self._prefetch(ahead)
            began = time.perf_counter()
            parts.append(self.run(chunk))
            seconds[unit] += time.perf_counter() - began
            finished[unit] = time.time()
        self._prefetch(None)  # drop what a retried or split chunk left unused
        if not parts:
            return block
        out = merge(parts)
        if COMPUTE in out:  # stages keep row count and order: the unit's rows are where they came in
            out[COMPUTE] = out[COMPUTE].astype(np.float64, copy=True)
            out[COMPUTE][starts[:-1]] += seconds  # this stage's seconds, on the unit's first row
            out[CREATED] = np.repeat(finished, np.diff(starts)).astype(np.float64)  # the last stage's stamp stays
        return out

    def _prefetch(self, chunk) -> None:
        """Tell the stage about a chunk ahead (None: the block is done). Only an optimisation: a chunk
        the stage cannot prepare is prepared when it runs, where its failure is handled as any other."""
        prefetch = getattr(self.stage, "prefetch", None)
        if prefetch is None:
            return
        try:
            prefetch(chunk)
        except Exception as exc:
            _actor_log().debug("%s: prefetch skipped (%s: %s)", self.name, type(exc).__name__, exc)

    def run(self, chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Stages mark failed rows in place: a chunk retried after an exception starts clean.
        chunk = {k: v.copy() if k in ERROR_COLUMNS or k == SPLITS else v for k, v in chunk.items()}
        n = len(chunk["id"])
        key = self.ledger.key(self.name, chunk["id"]) if self.ledger else None
        crashes, last = self.ledger.crashes(key) if key else (0, "")
        if crashes >= FATAL_LIMIT:  # it broke the device every time: never run it whole again
            if n == 1:
                return self._fail_row(chunk, "FatalDeviceError",
                                      f"fatal device error at batch size 1 ({crashes} actor restarts): {last}")
            return self._halves(chunk, oom=False)
        started = time.perf_counter()
        try:
            out = self.stage(chunk)
            metrics.stage_batch(self.name, time.perf_counter() - started)
            return out
        except Exception as exc:
            # Only text leaves this block: the exception's traceback holds the failed call's frames
            # and so its tensors, which must be gone before the retries (else empty_cache frees nothing).
            failure, oom, fatal = (type(exc).__name__, str(exc)), is_oom(exc), is_fatal_device_error(exc)
            if fatal and self.ledger is None:
                raise
        if fatal:
            self.ledger.record(key, f"{failure[0]}: {failure[1]}")
            self.exit_for_restart(self.name, f"{failure[0]}: {failure[1]}")
            raise RuntimeError(f"{self.name}: fatal device error, the actor did not exit")  # unreachable under Ray
        if oom:
            _release_memory()
            metrics.oom_split(self.name)
        if n == 1:
            return self._fail_row(chunk, failure[0], f"{'out of memory at batch size 1: ' if oom else ''}{failure[1]}")
        return self._halves(chunk, oom)

    def _halves(self, chunk, oom: bool) -> dict[str, np.ndarray]:
        n = len(chunk["id"])
        half = n // 2
        out = merge([self.run({k: v[a:b] for k, v in chunk.items()}) for a, b in ((0, half), (half, n))])
        if oom:
            out[SPLITS] = out[SPLITS].copy()
            out[SPLITS][0] += 1
        return out

    def _fail_row(self, chunk, error_type: str, message: str) -> dict[str, np.ndarray]:
        for name, value in zip(ERROR_COLUMNS, (self.name, error_type, message[:2000])):
            chunk[name][0] = value
        # Stages pass failed rows through with empty outputs: run it again so that the row carries
        # the same columns as its batch-mates (a failed row computes nothing on the device).
        try:
            return self.stage(chunk)
        except Exception:
            return chunk


class Fused:
    """Every model stage of the job in one actor: each stage wrapped in its own Chunked (its batch
    size, its OOM splitting), applied in order to the block. `stages`: [(stage class, batch size,
    constructor kwargs)]. torch's thread count is per process: the last stage's setting would win,
    so it is set once more from `threads`."""

    def __init__(self, stages: list, threads: int, fatal_scope: str | None = None, progress=None, **kwargs):
        import torch

        self.stages = [Chunked(cls, batch_size, fatal_scope=fatal_scope, progress=progress, **kwargs, **extra)
                       for cls, batch_size, extra in stages]
        torch.set_num_threads(threads)

    def __call__(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for stage in self.stages:
            block = stage(block)
        return block


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
