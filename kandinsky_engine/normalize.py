"""Manifest rows as the engine reads them, whatever wrote them (pandas, a CSV reader, a notebook).

- `id` may be an integer column (pandas' default index, a database key): it is read as text,
  losslessly (`42` -> `"42"`). Large-string columns (pandas' default) are strings.
- Integer parameters (`seed`, `width`, `height`, the step counts) may be float columns (pandas makes
  an int column with a missing value float64): whole numbers within int64 are read as integers;
  anything else (2.5, 2**63, NaN where a value is required) is a row error at validation
  (`problems`), and the value reaches no stage.
- Relative input paths (`image_uri: imgs/red.png`, also mix items' `image_uri`) are relative to
  the folder of the manifest file that holds them, on disk and on object stores, wherever the job
  runs; the output records the resolved URI.

`normalize` is applied to every table of manifest rows the engine reads: the validation of each
file (manifest.check_file), the read tasks (pipelines/read.py), and the tools that look rows up.
"""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.compute as pc

INTEGER_PARAMS = ("seed", "width", "height", "num_inference_steps", "prior_num_inference_steps")
URI_COLUMNS = ("image_uri", "mask_uri", "hint_uri")
INT64_MAX = 2**63 - 1


def normalize(table: pa.Table, manifest_file: str) -> tuple[pa.Table, list[tuple[int, str]]]:
    """(the table as the engine reads it, [(row, problem)] for values it cannot read)."""
    problems: list[tuple[int, str]] = []
    names = table.column_names
    if "id" in names and pa.types.is_integer(table.schema.field("id").type):
        table = _replace(table, "id", pc.cast(table["id"], pa.string()))
    for name in INTEGER_PARAMS:
        if name in names and pa.types.is_floating(table.schema.field(name).type):
            values, bad = _whole(table[name].to_pylist(), name)
            problems += bad
            table = _replace(table, name, pa.array(values, pa.int64()))
    base = folder_of(manifest_file)
    for name in URI_COLUMNS:
        if name in names and pa.types.is_string(table.schema.field(name).type):
            table = _replace(table, name, pa.array([resolve(v, base) for v in table[name].to_pylist()], pa.string()))
    if "mix" in names:
        mix = [None if items is None else [{**item, "image_uri": resolve(item.get("image_uri"), base)} for item in items]
               for items in table["mix"].to_pylist()]
        table = _replace(table, "mix", pa.array(mix, table.schema.field("mix").type))
    return table, problems


def normalize_schema(schema: pa.Schema) -> pa.Schema:
    """The schema of `normalize`'s tables: integer ids as strings, float integer parameters as int64;
    and large strings as strings (what pandas writes, and what other writers do not: the same rows
    are one job whoever wrote them)."""
    fields = []
    for field in schema:
        if (field.name == "id" and pa.types.is_integer(field.type)) or pa.types.is_large_string(field.type):
            field = field.with_type(pa.string())
        elif field.name in INTEGER_PARAMS and pa.types.is_floating(field.type):
            field = field.with_type(pa.int64())
        fields.append(field)
    return pa.schema(fields, metadata=schema.metadata)


def text_ids(column) -> list:
    """An id column's values as the engine names rows: integers as text."""
    if pa.types.is_integer(column.type):
        column = pc.cast(column, pa.string())
    return column.to_pylist()


def _whole(values: list, name: str) -> tuple[list, list[tuple[int, str]]]:
    out, bad = [], []
    for r, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(None)  # missing: the job default (or, for seed, one derived from the id)
        elif math.isfinite(v) and v == int(v) and -INT64_MAX - 1 <= int(v) <= INT64_MAX:
            out.append(int(v))
        else:
            out.append(None)
            bad.append((r, f"column '{name}' must be a whole number within int64, got {v!r}"))
    return out, bad


def folder_of(manifest_file: str) -> str:
    """The folder relative input paths of `manifest_file` are taken from (a URL's query dropped)."""
    path = manifest_file.split("?", 1)[0] if "://" in manifest_file else manifest_file
    return path.rsplit("/", 1)[0] if "/" in path else "."


def resolve(uri, base: str):
    """`uri` if it is absolute (a URL, a chained URL, an absolute or home path), else `base/uri`."""
    if not isinstance(uri, str) or not uri or "://" in uri or "::" in uri or uri.startswith(("/", "~")):
        return uri
    return f"{base}/{uri}"


def _replace(table: pa.Table, name: str, column) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, pa.field(name, column.type), column)


def not_utf8(name: str, table: pa.Table, offset: int) -> list[str]:
    """Problems for string cells that are not valid UTF-8 (Parquet does not check what writers put in
    a string column): named by file, column and row number, since such an id cannot be shown."""
    problems = []
    for column in table.column_names:
        values = table.column(column)
        if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
            continue
        try:
            values.validate(full=True)
        except pa.ArrowInvalid:
            raw = values.cast(pa.binary() if pa.types.is_string(values.type) else pa.large_binary()).to_pylist()
            rows = [offset + r for r, v in enumerate(raw) if v is not None and not _utf8(v)]
            problems.append(f"{name}: column '{column}' is not valid UTF-8 text at row(s) {rows[:5]} (e.g. "
                            f"{raw[rows[0] - offset]!r}); write the file with text columns encoded as UTF-8")
    return problems


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
