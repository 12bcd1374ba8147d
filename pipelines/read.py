"""Reading the manifest as units of work: a Ray Data datasource over the run's file plans.

Each read task is one unit (up to MAX_READ_TASKS units per run; beyond, a few consecutive units of
one row group) and yields one Arrow table per unit, already tagged with the unit's name, attempt
and digest and, for a retried unit, holding only its rows not in data/ yet. Ray Data merges what
one task yields into one block, so one unit per task is what makes one unit per block.
Units therefore come straight from the files: the same in every run, with no global order, no
repartition and no `preserve_order` (which cost ~18% throughput and blocks heads of lines).
"""

from __future__ import annotations

from functools import partial

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from kandinsky_engine.manifest import file_stamp
from kandinsky_engine.normalize import normalize
from kandinsky_engine.storage import redact_url, url_to_fs
from kandinsky_engine.units import file_key, unit_digest

from .reconcile import FilePlan
from .prepare import ATTEMPT, DIGEST, UNIT, UNIT_ROWS

# Read tasks, at most (so that the driver's plan stays small at any manifest size). Up to this many
# units, each read task is one unit, so each block is one unit: stages overlap from the second unit
# on, and no block holds more than a unit's images. Beyond it, a task reads a few consecutive
# units of a row group, which Ray Data hands on as one block.
MAX_READ_TASKS = 20_000


class ManifestUnits(Datasource):
    def __init__(self, plans: list[FilePlan], rows_per_block: int, storage_options: dict):
        self.plans, self.rows_per_block, self.storage_options = plans, rows_per_block, storage_options

    def get_name(self) -> str:
        return "ManifestUnits"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        """One task per unit to run (see MAX_READ_TASKS). The count does not depend on
        `parallelism`: read with `override_num_blocks=len(tasks)`, or Ray Data splits the tasks'
        output blocks to reach its default parallelism, which would cut units in pieces."""
        if getattr(self, "_tasks", None) is None:
            self._tasks = self._make_tasks()
        return self._tasks

    def _make_tasks(self) -> list[ReadTask]:
        runs = []  # consecutive units of one row group: [(plan, starts)]
        for plan in self.plans:
            starts = [s for s in range(0, plan.stop, self.rows_per_block) if s not in plan.done]
            if starts:
                runs += [(plan, group) for group in _by_row_group(plan.file, starts, self.storage_options)]
        units = sum(len(group) for _, group in runs)
        per_task = -(-units // MAX_READ_TASKS)
        tasks = []
        for plan, group in runs:
            for i in range(0, len(group), per_task):
                starts = group[i : i + per_task]
                rows = sum(min(s + self.rows_per_block, plan.file.num_rows) - s for s in starts)
                read = partial(read_units, plan.file, starts, {s: plan.retry[s] for s in starts if s in plan.retry},
                               self.rows_per_block, self.storage_options)
                tasks.append(ReadTask(read, BlockMetadata(num_rows=rows, size_bytes=None, exec_stats=None,
                                                          input_files=None)))
        return tasks


def _by_row_group(file, starts: list[int], storage_options) -> list[list[int]]:
    """Unit starts grouped by the row group they start in (one read task each)."""
    fs, _ = url_to_fs(file.path, storage_options)
    with fs.open(file.path, "rb") as f:
        bounds = _bounds(pq.ParquetFile(f).metadata)
    groups, g = [], 0
    for start in starts:
        while start >= bounds[g + 1]:
            g += 1
        if not groups or groups[-1][0] < bounds[g]:
            groups.append([])
        groups[-1].append(start)
    return groups


def read_units(file, starts: list[int], retry: dict, rows_per_block: int, storage_options: dict):
    """Yield one table per unit starting at `starts` (sorted) of `file`."""
    fs, _ = url_to_fs(file.path, storage_options)
    if file_stamp(fs, file.path) != file.stamp:
        raise RuntimeError(f"manifest file {redact_url(file.path)} changed while the job ran; run the job again")
    key = file_key(file.relpath)
    with fs.open(file.path, "rb") as f:
        parquet = pq.ParquetFile(f)
        bounds = _bounds(parquet.metadata)
        for start in starts:
            stop = min(start + rows_per_block, file.num_rows)
            groups = [g for g in range(len(bounds) - 1) if bounds[g] < stop and bounds[g + 1] > start]
            # A unit spans one row group or a few; consecutive units (and tasks run by this worker)
            # share row groups, so each is decoded once per worker.
            table = pa.concat_tables([_row_group(parquet, file.path, file.stamp, g) for g in groups])
            # take() copies: a slice would carry the whole row group's buffers into the block.
            rows = table.take(pa.array(range(start - bounds[groups[0]], stop - bounds[groups[0]]), pa.int64()))
            yield _unit_table(rows, file, key, start, stop, retry.get(start))


_cached: dict = {}


def _row_group(parquet: pq.ParquetFile, path: str, stamp, g: int) -> pa.Table:
    """Row group `g` of a manifest file, keeping the last two decoded in this worker process:
    read tasks are one unit each (see ManifestUnits), and many units share a row group."""
    key = (path, stamp, g)
    if key not in _cached:
        while len(_cached) >= 2:
            _cached.pop(next(iter(_cached)))
        _cached[key] = parquet.read_row_group(g)
    return _cached[key]


def _bounds(meta) -> list[int]:
    """First row of every row group, and the row count last."""
    bounds = [0]
    for i in range(meta.num_row_groups):
        bounds.append(bounds[-1] + meta.row_group(i).num_rows)
    return bounds


def _unit_table(table: pa.Table, file, key: str, start: int, stop: int, retry) -> pa.Table:
    table, _ = normalize(table, file.path)  # what validation read: its row errors name what it could not
    attempt = 1
    if retry is not None:
        attempt, done = retry
        table = table.filter(pa.array([i not in done for i in table["id"].to_pylist()], pa.bool_()))
    n = table.num_rows
    digest = unit_digest(file.relpath, file.identity, start, stop)
    return (table.append_column(UNIT, pa.array([f"{key}/{start}"] * n, pa.string()))
                 .append_column(ATTEMPT, pa.array([attempt] * n, pa.int64()))
                 .append_column(DIGEST, pa.array([digest] * n, pa.string()))
                 .append_column(UNIT_ROWS, pa.array([n] * n, pa.int64())))
