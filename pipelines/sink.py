"""ShardSink: the job's writer. Good rows go to data/, failed rows to errors/, as Parquet shards.

Each write task writes its rows as shards named `part-{run}-{task:06d}-{n:03d}.parquet`, at most
`rows_per_shard` rows each, through fsspec (local disk, s3://, ...). A shard is written under a
temporary name and moved into place, so readers of data/*.parquet never see a torn file.
"""

from __future__ import annotations

import uuid
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from kandinsky_engine.config import OutputConfig
from kandinsky_engine.manifest import MIX_ITEM
from kandinsky_engine.rows import ERROR_COLUMNS
from kandinsky_engine.storage import url_to_fs

# Fixed types for the engine's own columns: a block whose values are all null would otherwise
# get Arrow's null type and its shard would disagree with the others.
DATA_TYPES = {
    "id": pa.string(), "task": pa.string(), "prompt": pa.string(), "negative_prompt": pa.string(),
    "seed": pa.int64(), "width": pa.int64(), "height": pa.int64(), "image_width": pa.int64(),
    "image_height": pa.int64(), "num_inference_steps": pa.int64(), "guidance_scale": pa.float64(),
    "prior_num_inference_steps": pa.int64(), "prior_guidance_scale": pa.float64(), "strength": pa.float64(),
    "image_uri": pa.string(), "mask_uri": pa.string(), "image": pa.binary(), "prior_model": pa.string(),
    "decoder_model": pa.string(), "mix": pa.list_(MIX_ITEM),
}
ERROR_SCHEMA = pa.schema([("id", pa.string()), ("task", pa.string()), ("stage", pa.string()),
                          ("error_type", pa.string()), ("message", pa.string())])


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
    def __init__(self, output: OutputConfig, storage_options: dict | None = None):
        self.output = output
        self.storage_options = storage_options or {}
        self.run = uuid.uuid4().hex[:12]  # one per job run: shards of two runs never collide

    def get_name(self) -> str:
        return "ShardSink"

    def write(self, blocks: Iterable[Block], ctx) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"data_rows": 0, "error_rows": 0}
        table = pa.concat_tables(tables, promote_options="permissive")
        failed = pc.not_equal(table["error_message"], "")
        internal = [c for c in (*ERROR_COLUMNS, "_unit") if c in table.column_names]
        data = with_fixed_types(table.filter(pc.invert(failed)).drop_columns(internal))
        errors = table.filter(failed)
        errors = pa.table(
            [errors["id"], errors["task"], errors["error_stage"], errors["error_type"], errors["error_message"]],
            schema=ERROR_SCHEMA,
        ) if errors.num_rows else None
        fs, root = url_to_fs(self.output.path, self.storage_options)
        step = self.output.rows_per_shard
        for n, start in enumerate(range(0, data.num_rows, step)):
            self._put(fs, f"{root}/data", f"part-{self.run}-{ctx.task_idx:06d}-{n:03d}.parquet", data.slice(start, step))
        if errors is not None:
            self._put(fs, f"{root}/errors", f"part-{self.run}-{ctx.task_idx:06d}-000.parquet", errors)
        return {"data_rows": data.num_rows, "error_rows": 0 if errors is None else errors.num_rows}

    @staticmethod
    def _put(fs, folder: str, name: str, table: pa.Table) -> None:
        fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.tmp-{name}"  # hidden from data/*.parquet readers until complete
        with fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        fs.mv(tmp, f"{folder}/{name}")
