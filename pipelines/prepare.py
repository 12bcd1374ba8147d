"""The first step after the read: one block in, one unit of work out, ready for the stages.

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

# Internal columns: the unit key and its attempt, the rows the unit must have, OOM splits, the
# digest of the unit's manifest rows (part of every shard name).
UNIT, ATTEMPT, UNIT_ROWS, SPLITS, DIGEST = "_unit", "_attempt", "_unit_rows", "_oom_splits", "_digest"
INTERNAL = (UNIT, ATTEMPT, UNIT_ROWS, SPLITS, DIGEST, PASSTHROUGH_BLOB)
# Engine input columns as the stages get them (a manifest may lack any of the optional ones).
STAGE_INPUT_TYPES = {"id": pa.string(), "prompt": pa.string(), **{
    name: {"string": pa.string(), "binary": pa.binary()}[kind]
    for name, kind in ENGINE_INPUTS.items() if kind in ("string", "binary") and name not in ("id", "prompt")}}


def prepare_unit(table: pa.Table, *, units: dict[str, int], todo: dict[int, tuple[int, list | None]],
                 digests: dict[int, str], row_errors: dict[str, str], defaults: GenerationDefaults,
                 passthrough: list[pa.Field]) -> pa.Table:
    """Name the block's unit, keep the rows still to do, resolve their parameters, pack the rest.

    Blocks are cut in manifest order, so a block is exactly one unit and its first id says which.
    A committed unit leaves no rows; a unit being retried keeps its failed rows only. Rows that
    failed validation are marked failed here.
    """
    if table.num_rows == 0:
        return table
    first = table["id"][0].as_py()
    unit = units.get(first)
    if unit is None:
        raise RuntimeError(f"a block starts at id {first!r}, not at a unit boundary")
    attempt, rows = todo.get(unit, (0, []))
    if rows is not None:
        wanted = set(rows)  # Python strings: exact comparison
        table = table.filter(pa.array([i in wanted for i in table["id"].to_pylist()], pa.bool_()))
    n = table.num_rows
    if n == 0:
        return table
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
    columns.update({
        UNIT: pa.array([unit] * n, pa.int64()), ATTEMPT: pa.array([attempt] * n, pa.int64()),
        UNIT_ROWS: pa.array([n] * n, pa.int64()), SPLITS: pa.array([0] * n, pa.int64()),
        DIGEST: pa.array([digests[unit]] * n, pa.string()),
        # One blob for the unit, on its first row: the writer joins it back by id.
        PASSTHROUGH_BLOB: pa.array([blob] + [None] * (n - 1), pa.binary()),
    })
    return pa.table(columns)


def _column(table: pa.Table, name: str, type_: pa.DataType) -> pa.ChunkedArray | pa.Array:
    if name not in table.column_names:
        return pa.nulls(table.num_rows, type_)
    column = table[name]
    return column if column.type == type_ else pc.cast(column, type_)
