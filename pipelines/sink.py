"""ShardSink: the job's writer. Commits each unit of work as shards of data/ and errors/.

The layout and the commit protocol are in pipelines/output.py. A write task may get several
units; it commits them one by one. A unit always reaches the writer whole (see `write`).

Each row records when it was made: `created_at`, when the last model stage finished its unit (set
by pipelines/generate.py's Chunked, one value for every row of a unit's attempt). The stamp travels
in the block, so a write task that Ray retries on the same blocks writes the same bytes; only a
unit computed again (by a later run, or a block Ray had to recompute) carries a new time. Why other
bytes under a shard's name are safe: pipelines/output.py.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from kandinsky_engine.columns import (IMAGE_TYPE, OUTPUT_TYPES, PASSTHROUGH_BLOB, SIGNAL_TYPES, engine_version,
                                      unpack_passthrough)
from kandinsky_engine.stages.hint import CONTROLNET_TASKS
from kandinsky_engine.rows import is_null
from kandinsky_engine.storage import redact_url, remove_file, url_to_fs

from . import metrics
from .output import DATA, ERRORS, LeaseLost, data_name, errors_name, lease_owner, put
from .prepare import ATTEMPT, COMPUTE, CREATED, DIGEST, SPLITS, UNIT, UNIT_ROWS
from .shards import image_path

ERROR_SCHEMA = pa.schema([("id", pa.string()), ("task", pa.string()), ("stage", pa.string()),
                          ("error_type", pa.string()), ("message", pa.string()), ("attempt", pa.int64())])
URI_COLUMNS = ("image_uri", "mask_uri", "hint_uri")


def engine_column(rows: pa.Table, name: str, type_: pa.DataType) -> pa.Array:
    """Column `name` of a stage output as `type_`. Ray rebuilds Arrow columns from numpy, so an
    all-None object column arrives as null or NaN floats, and an int column with nulls as floats:
    values go through Python, NaN read as null."""
    if name not in rows.column_names:
        return pa.nulls(rows.num_rows, type_)
    column = rows[name]
    if column.type == type_:
        return column.combine_chunks()
    if isinstance(column.type, pa.BaseExtensionType):  # Ray's tensor column of (n, D) embeddings
        return pa.array([None if v is None else v.tolist() for v in column.to_pylist()], type_)
    values = [None if is_null(v) else v for v in column.to_pylist()]
    if pa.types.is_integer(type_):
        values = [None if v is None else int(v) for v in values]
    return pa.array(values, type_)


def mix_recipe(items) -> list[dict] | None:
    """A mix cell as written: each item's text or image URI (redacted) and image sha256, and weight."""
    if is_null(items):
        return None
    return [{"text": item.get("text"), "image_uri": None if is_null(item.get("image_uri")) else redact_url(item["image_uri"]),
             "image_sha256": item.get("image_sha256"), "weight": item.get("weight")} for item in items]


def data_table(rows: pa.Table, schema: pa.Schema, identity: dict[str, str], blobs: list[bytes],
               image_format: str = "png", created_at: datetime | None = None) -> pa.Table:
    """The rows that succeeded, in the job's output schema: engine columns with their fixed types,
    URIs redacted, model identities and provenance (`created_at`: when the unit's images were made,
    now if None), then the pass-through columns joined back by id from the unit's `blobs` (taken before
    failed rows were dropped: the blob rides on the unit's first row, which may be a failed one)."""
    n = rows.num_rows
    provenance = {"model_revision": identity.get("model_revision"), "engine_version": engine_version(),
                  "created_at": created_at or datetime.now(timezone.utc)}
    columns = {}
    for name, type_ in OUTPUT_TYPES.items():
        if name in URI_COLUMNS:
            values = engine_column(rows, name, type_).to_pylist()
            columns[name] = pa.array([None if v is None else redact_url(v) for v in values], type_)
        elif name == "mix":
            values = rows["mix"].to_pylist() if "mix" in rows.column_names else [None] * n
            columns[name] = pa.array([mix_recipe(v) for v in values], type_)
        elif name == "image":  # the struct of an HF Image feature: the bytes and their file name
            images = engine_column(rows, "image", pa.binary()).to_pylist()
            columns[name] = pa.array([{"bytes": b, "path": image_path(i, image_format)}
                                      for i, b in zip(rows["id"].to_pylist(), images)], IMAGE_TYPE)
        elif name in ("prior_model", "decoder_model"):  # null where the family has no such part (Kandinsky 3: no prior)
            columns[name] = pa.array([identity.get(name)] * n, type_)
        elif name in provenance:
            columns[name] = pa.array([provenance[name]] * n, type_)
        elif name == "depth_model":
            # Only rows whose hint was estimated depend on the depth model.
            tasks = rows["task"].to_pylist()
            given = [a is not None or b is not None for a, b in zip(engine_column(rows, "hint_sha256", pa.string()).to_pylist(),
                                                                   engine_column(rows, "hint_uri", pa.string()).to_pylist())]
            columns[name] = pa.array([identity[name] if t in CONTROLNET_TASKS and not g else None
                                      for t, g in zip(tasks, given)], type_)
        else:
            columns[name] = engine_column(rows, name, type_)
    for name in SIGNAL_TYPES:
        if name in schema.names:
            columns[name] = engine_column(rows, name, SIGNAL_TYPES[name])
    extra = [f for f in schema if f.name not in OUTPUT_TYPES and f.name not in SIGNAL_TYPES]
    if extra:
        given = unpack_passthrough(blobs) if blobs else None
        position = {} if given is None else {row_id: i for i, row_id in enumerate(given["id"].to_pylist())}
        ids = rows["id"].to_pylist()
        missing = [i for i in ids if i not in position]
        if missing:
            raise RuntimeError(f"pass-through columns missing for ids {missing[:5]}")
        take = pa.array([position[i] for i in ids], pa.int64())
        for f in extra:
            columns[f.name] = given[f.name].take(take) if n else pa.nulls(0, f.type)
    return pa.table([columns[f.name] for f in schema], schema=schema)


def errors_table(rows: pa.Table, attempt: int) -> pa.Table:
    messages = [redact_url(m) for m in rows["error_message"].to_pylist()]
    return pa.table([rows["id"], engine_column(rows, "task", pa.string()), rows["error_stage"], rows["error_type"],
                     pa.array(messages, pa.string()), pa.array([attempt] * rows.num_rows, pa.int64())],
                    schema=ERROR_SCHEMA)


class ShardSink(Datasink):
    """Writes each unit's rows as one data shard (and its failures as one errors shard), named by
    unit, unit digest and attempt. `schema` is the job's output schema; `identity` the model
    columns (models.model_identity); `output`: the job's OutputConfig (shard format, image format)."""

    def __init__(self, path: str, storage_options: dict | None, schema: pa.Schema, identity: dict[str, str],
                 tmp_tag: str | None = None, output=None, progress=None, lease_owner: str | None = None):
        self.path = path
        self.format = output.format if output is not None else "parquet"
        self.image_format = output.image_format if output is not None else "png"
        self.storage_options = storage_options or {}
        self.schema = schema
        self.identity = identity
        # Temporary names of this run never collide with another's.
        self.tmp_tag = tmp_tag or uuid.uuid4().hex[:12]
        self.records: list[dict] = []
        self.oom_splits = 0
        self.compute_s = 0.0  # model-stage seconds of the units this run committed
        self.committed_at: list[float] = []  # epoch seconds of each write task's last commit: the run's timeline
        self.progress = progress  # a CommitCounter actor (pipelines/progress.py) told of each commit, or None
        # The run's lease owner id (jobs/lease.py): checked before each commit, so that a run whose
        # lease another run took stops committing at once instead of at its end.
        self.lease_owner = lease_owner

    def get_name(self) -> str:
        return "ShardSink"

    def write(self, blocks: Iterable[Block], ctx) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"records": [], "oom_splits": 0, "committed_at": None}
        table = pa.concat_tables(tables, promote_options="permissive")
        fs, root = url_to_fs(self.path, self.storage_options)
        records = []
        for unit in pc.unique(table[UNIT]).to_pylist():
            rows = table.filter(pc.equal(table[UNIT], unit))
            if rows.num_rows != rows[UNIT_ROWS][0].as_py():
                # Ray splits a map output above DataContext.target_max_block_size; the pipeline raises
                # that limit, so this only fires if a unit outgrew it: a half unit must never commit.
                raise RuntimeError(f"unit {unit} reached the writer with {rows.num_rows} of "
                                   f"{rows[UNIT_ROWS][0].as_py()} rows; lower input.rows_per_block")
            key, start = unit.rsplit("/", 1)
            if self.lease_owner is not None and lease_owner(fs, root) != self.lease_owner:
                raise LeaseLost(f"output {redact_url(self.path)}: another run took this run's lease; unit {unit} and "
                                "every later one were not committed (rerun to resume)")
            committed = self._commit(fs, root, key, int(start), str(rows[DIGEST][0].as_py()),
                                     int(rows[ATTEMPT][0].as_py()), rows)
            records += committed
            failed = rows.filter(pc.not_equal(rows["error_message"], ""))
            kinds = dict(Counter(f"{s}: {t}" for s, t in zip(failed["error_stage"].to_pylist(),
                                                               failed["error_type"].to_pylist())))
            metrics.unit_committed(self.path, rows.num_rows - failed.num_rows, kinds)
            if self.progress is not None:  # fire and forget: progress is a display, never a dependency
                self.progress.commit.remote(unit, rows.num_rows - failed.num_rows, failed.num_rows, kinds)
        splits = int(pc.sum(table[SPLITS]).as_py() or 0) if SPLITS in table.column_names else 0
        return {"records": records, "oom_splits": splits, "committed_at": time.time()}

    def _commit(self, fs, root: str, key: str, start: int, digest: str, attempt: int, rows: pa.Table) -> list[dict]:
        failed = pc.not_equal(rows["error_message"], "")
        blobs = [b for b in rows[PASSTHROUGH_BLOB].to_pylist() if b is not None]
        made = rows[CREATED][0].as_py() if CREATED in rows.column_names else None
        created_at = datetime.fromtimestamp(made, timezone.utc) if made else None  # 0: no model stage ran
        data = data_table(rows.filter(pc.invert(failed)), self.schema, self.identity, blobs, self.image_format,
                          created_at)
        errors = errors_table(rows.filter(failed), attempt)
        data_file, errors_file = data_name(key, start, digest, attempt, self.format), errors_name(key, start, digest)
        records = []
        # Order is the protocol (pipelines/output.py): attempt 1 records its failures before its
        # data shard marks the unit committed; a retry commits the rows that now succeed before
        # it rewrites (or removes) the errors shard.
        if attempt == 1:
            if errors.num_rows:
                records.append(put(fs, root, ERRORS, errors_file, errors, self.tmp_tag))
            records.append(put(fs, root, DATA, data_file, data, self.tmp_tag))
        else:
            if data.num_rows:
                records.append(put(fs, root, DATA, data_file, data, self.tmp_tag))
            if errors.num_rows:
                records.append(put(fs, root, ERRORS, errors_file, errors, self.tmp_tag))
            else:
                remove_file(fs, f"{root}/{ERRORS}/{errors_file}")
        if records and COMPUTE in rows.column_names:
            # The unit's model-stage seconds, on the record of its data shard (or of its errors shard when
            # every row of a retry failed again): summed over the records, each unit's attempt counts once.
            target = next((r for r in records if r["file"].startswith(f"{DATA}/")), records[0])
            target["compute_s"] = round(float(pc.sum(rows[COMPUTE]).as_py() or 0.0), 3)
        return records

    def on_write_complete(self, write_result) -> None:
        for result in write_result.write_returns:
            self.records += result["records"]
            self.oom_splits += result["oom_splits"]
            self.compute_s += sum(r.get("compute_s") or 0.0 for r in result["records"])
            if result["committed_at"] is not None:
                self.committed_at.append(result["committed_at"])
