"""ShardSink: the job's writer. Commits each unit of work as shards of data/ and errors/.

The layout and the commit protocol are in pipelines/output.py. A write task may get several
units; it commits them one by one. A unit always reaches the writer whole (see `write`).
"""

from __future__ import annotations

import uuid
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from kandinsky_engine.manifest import MIX_ITEM
from kandinsky_engine.rows import ERROR_COLUMNS
from kandinsky_engine.storage import url_to_fs

from .output import DATA, ERRORS, data_name, errors_name, put

# Internal columns: the unit key and its attempt, the rows the unit must have, OOM splits.
UNIT, ATTEMPT, UNIT_ROWS, SPLITS = "_unit", "_attempt", "_unit_rows", "_oom_splits"
INTERNAL = (UNIT, ATTEMPT, UNIT_ROWS, SPLITS)

# Fixed types for the engine's own columns: a block whose values are all null would otherwise
# get Arrow's null type and its shard would disagree with the others.
DATA_TYPES = {
    "id": pa.string(), "task": pa.string(), "prompt": pa.string(), "negative_prompt": pa.string(),
    "seed": pa.int64(), "width": pa.int64(), "height": pa.int64(), "image_width": pa.int64(),
    "image_height": pa.int64(), "num_inference_steps": pa.int64(), "guidance_scale": pa.float64(),
    "prior_num_inference_steps": pa.int64(), "prior_guidance_scale": pa.float64(), "strength": pa.float64(),
    "image_uri": pa.string(), "mask_uri": pa.string(), "image": pa.binary(), "prior_model": pa.string(),
    "decoder_model": pa.string(), "mix": pa.list_(MIX_ITEM),
    "image_sha256": pa.string(), "mask_sha256": pa.string(), "hint_sha256": pa.string(),  # kandinsky_engine.inputs
}
ERROR_SCHEMA = pa.schema([("id", pa.string()), ("task", pa.string()), ("stage", pa.string()),
                          ("error_type", pa.string()), ("message", pa.string()), ("attempt", pa.int64())])


def with_fixed_types(table: pa.Table) -> pa.Table:
    for name, type_ in DATA_TYPES.items():
        if name not in table.column_names or table.schema.field(name).type == type_:
            continue
        column = table[name]
        if pa.types.is_floating(column.type) and not pa.types.is_floating(type_):
            # Ray's all-None object column arrives as NaN floats: it was all null.
            column = pa.nulls(len(column), type_)
        table = table.set_column(table.column_names.index(name), name, column.cast(type_))
    return table


class ShardSink(Datasink):
    def __init__(self, path: str, storage_options: dict | None = None):
        self.path = path
        self.storage_options = storage_options or {}
        self.tmp_tag = uuid.uuid4().hex[:12]  # temporary names of this run never collide with another's
        self.records: list[dict] = []
        self.oom_splits = 0

    def get_name(self) -> str:
        return "ShardSink"

    def write(self, blocks: Iterable[Block], ctx) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"records": [], "oom_splits": 0}
        table = pa.concat_tables(tables, promote_options="permissive")
        fs, root = url_to_fs(self.path, self.storage_options)
        records, units = [], table[UNIT].to_numpy()
        for unit in np.unique(units):
            rows = table.filter(pc.equal(table[UNIT], unit))
            if rows.num_rows != rows[UNIT_ROWS][0].as_py():
                # Ray splits a map output above DataContext.target_max_block_size; the pipeline raises
                # that limit, so this only fires if a unit outgrew it: a half unit must never commit.
                raise RuntimeError(f"unit {unit} reached the writer with {rows.num_rows} of "
                                   f"{rows[UNIT_ROWS][0].as_py()} rows; lower input.rows_per_block")
            records += self._commit(fs, root, int(unit), int(rows[ATTEMPT][0].as_py()), rows)
        splits = int(pc.sum(table[SPLITS]).as_py() or 0) if SPLITS in table.column_names else 0
        return {"records": records, "oom_splits": splits}

    def _commit(self, fs, root: str, unit: int, attempt: int, rows: pa.Table) -> list[dict]:
        failed = pc.not_equal(rows["error_message"], "")
        internal = [c for c in (*ERROR_COLUMNS, *INTERNAL) if c in rows.column_names]
        data = with_fixed_types(rows.filter(pc.invert(failed)).drop_columns(internal))
        errors = rows.filter(failed)
        errors = pa.table([errors["id"], errors["task"], errors["error_stage"], errors["error_type"],
                           errors["error_message"], pa.array([attempt] * errors.num_rows, pa.int64())],
                          schema=ERROR_SCHEMA)
        records = []
        # Order is the protocol (pipelines/output.py): attempt 1 records its failures before its
        # data shard marks the unit committed; a retry commits the rows that now succeed before
        # it rewrites (or removes) the errors shard.
        if attempt == 1:
            if errors.num_rows:
                records.append(put(fs, root, ERRORS, errors_name(unit), errors, self.tmp_tag))
            records.append(put(fs, root, DATA, data_name(unit, attempt), data, self.tmp_tag))
            return records
        if data.num_rows:
            records.append(put(fs, root, DATA, data_name(unit, attempt), data, self.tmp_tag))
        if errors.num_rows:
            records.append(put(fs, root, ERRORS, errors_name(unit), errors, self.tmp_tag))
        elif fs.exists(f"{root}/{ERRORS}/{errors_name(unit)}"):
            fs.rm(f"{root}/{ERRORS}/{errors_name(unit)}")
        return records

    def on_write_complete(self, write_result) -> None:
        for result in write_result.write_returns:
            self.records += result["records"]
            self.oom_splits += result["oom_splits"]
