"""The first step after the read: blocks of units in, rows ready for the stages out.

Runs on Arrow tables (`batch_format="pyarrow"`), before any numpy conversion, so that ids compare
as exact strings (numpy's fixed-width strings drop trailing NULs: `a` and `a\\x00` would be one id),
seeds keep all 63 bits, and pass-through columns keep their types. It never raises for a row: a
row whose parameters cannot be resolved is marked failed and goes to errors/ like any other.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from kandinsky_engine.columns import ENGINE_INPUTS, MIX_ITEM, PASSTHROUGH_BLOB, pack_passthrough
from kandinsky_engine.config import GenerationDefaults
from kandinsky_engine.rows import ERROR_COLUMNS, resolve_params

# Internal columns, set by the read (pipelines/read.py): the unit's name (file key/start row), its
# attempt, the digest of its rows (part of every shard name), the rows the unit must reach the
# writer with; then, set by the model stages (Chunked), OOM splits and model-stage seconds (both
# counted on a unit's first row) and when the last stage finished the unit (epoch seconds, every
# row: the rows' `created_at`); and the pass-through blob.
UNIT, ATTEMPT, DIGEST, UNIT_ROWS, SPLITS = "_unit", "_attempt", "_digest", "_unit_rows", "_oom_splits"
COMPUTE, CREATED = "_compute_s", "_created_at"
INTERNAL = (UNIT, ATTEMPT, DIGEST, UNIT_ROWS, SPLITS, COMPUTE, CREATED, PASSTHROUGH_BLOB)
# Engine input columns as the stages get them (a manifest may lack any of the optional ones).
STAGE_INPUT_TYPES = {"id": pa.string(), "prompt": pa.string(), **{
    name: {"string": pa.string(), "binary": pa.binary()}[kind]
    for name, kind in ENGINE_INPUTS.items() if kind in ("string", "binary") and name not in ("id", "prompt")}}


def prepare_units(block: pa.Table, *, row_errors: dict[str, str], defaults: GenerationDefaults,
                  passthrough: list[pa.Field]) -> pa.Table:
    """Resolve the rows of every unit in the block (Ray may bundle several) and pack the rest."""
    if block.num_rows == 0:
        return block
    names = block[UNIT].to_pylist()
    starts = [i for i in range(len(names)) if i == 0 or names[i] != names[i - 1]] + [len(names)]
    parts = [prepare_unit(block.slice(a, b - a), row_errors=row_errors, defaults=defaults, passthrough=passthrough)
             for a, b in zip(starts, starts[1:])]
    return pa.concat_tables(parts, promote_options="permissive")


def prepare_unit(table: pa.Table, *, row_errors: dict[str, str], defaults: GenerationDefaults,
                 passthrough: list[pa.Field]) -> pa.Table:
    """One unit's rows (tagged by the read): validation failures marked, parameters resolved,
    pass-through columns packed into one blob on the unit's first row."""
    n = table.num_rows
    ids = table["id"].to_pylist()
    errors = {name: [""] * n for name in ERROR_COLUMNS}

    def fail(i: int, stage: str, kind: str, message: str) -> None:
        if not errors["error_message"][i]:
            errors["error_stage"][i], errors["error_type"][i], errors["error_message"][i] = stage, kind, message

    for i, row_id in enumerate(ids):
        if (message := row_errors.get(row_id)) is not None:
            fail(i, "validate", "InvalidRow", message)
    params, problems = resolve_params(table, defaults)
    for i, problem in problems.items():
        fail(i, "resolve", "InvalidRow", f"{problem} at id {ids[i]!r}")
    try:
        blob = pack_passthrough(table, passthrough)
    except Exception as exc:  # e.g. a value that does not fit the unified type: the unit's rows fail
        blob = None
        for i in range(n):
            fail(i, "resolve", type(exc).__name__, f"pass-through columns: {exc}")

    columns = {name: _column(table, name, type_) for name, type_ in STAGE_INPUT_TYPES.items()}
    columns["mix"] = table["mix"] if "mix" in table.column_names else pa.nulls(n, pa.list_(MIX_ITEM))
    columns.update(params)
    columns.update({name: pa.array(values, pa.string()) for name, values in errors.items()})
    columns.update({name: table[name] for name in (UNIT, ATTEMPT, DIGEST, UNIT_ROWS)})
    columns[SPLITS] = pa.array([0] * n, pa.int64())
    columns[COMPUTE] = pa.array([0.0] * n, pa.float64())
    columns[CREATED] = pa.array([0.0] * n, pa.float64())
    # One blob for the unit, on its first row: the writer joins it back by id.
    columns[PASSTHROUGH_BLOB] = pa.array([blob] + [None] * (n - 1), pa.binary())
    return pa.table(columns)


def _column(table: pa.Table, name: str, type_: pa.DataType) -> pa.ChunkedArray | pa.Array:
    if name not in table.column_names:
        return pa.nulls(table.num_rows, type_)
    column = table[name]
    return column if column.type == type_ else pc.cast(column, type_)


def prepared_batch(rows: list[dict], defaults: GenerationDefaults, unit: str = "local/0") -> dict:
    """`rows` (dicts of manifest columns) as the first model stage receives them, outside Ray: tagged
    as one unit as the read tags it, prepared, as numpy. For calling the stage classes directly
    (`bench`'s stage loop, `plan`'s measurements)."""
    from kandinsky_engine.columns import passthrough_fields
    from kandinsky_engine.rows import numpy_batch

    keys = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist alone takes the first row's keys
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
    n = table.num_rows
    for name, value in ((UNIT, unit), (ATTEMPT, 1), (DIGEST, "0" * 16), (UNIT_ROWS, n)):
        table = table.append_column(name, pa.array([value] * n))
    return numpy_batch(prepare_unit(table, row_errors={}, defaults=defaults, passthrough=passthrough_fields(table.schema)))
