"""Manifest discovery and validation, run in the driver before any model loads.

Errors name the file, the column and the row id (or the row number where the id itself is bad),
and all problems found are reported together, so a bad manifest is fixed in one round.
"""

from __future__ import annotations

from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import TASKS, JobConfig
from .models import supported_tasks
from .storage import redact, url_to_fs

REQUIRED = {"id": "string", "prompt": "string"}
OPTIONAL = {
    "negative_prompt": "string",
    "seed": "integer",
    "width": "integer",
    "height": "integer",
    "num_inference_steps": "integer",
    "prior_num_inference_steps": "integer",
    "guidance_scale": "number",
    "prior_guidance_scale": "number",
    "task": "string",
    "strength": "number",
    "image_uri": "string",
    "image_bytes": "binary",
    "mask_uri": "string",
    "mask_bytes": "binary",
    "mix": "list",
    "hint_uri": "string",
    "hint_bytes": "binary",
}
# Inputs each task needs, each given as `{input}_uri` or `{input}_bytes`.
TASK_INPUTS = {"img2img": ("image",), "inpaint": ("image", "mask"), "variation": ("image",),
               "controlnet_img2img": ("image",)}
MIX_ITEM = pa.struct([("text", pa.string()), ("image_uri", pa.string()), ("image_bytes", pa.binary()),
                      ("weight", pa.float64())])
MINIMUM = {"seed": 0, "width": 1, "height": 1, "num_inference_steps": 1, "prior_num_inference_steps": 1}
MAX_REPORTED = 20  # problems listed in one error; the count of the rest is given


class ManifestError(ValueError):
    """The manifest cannot be run; the message lists every problem found."""


@dataclass
class Manifest:
    files: list[str]  # fully qualified paths, sorted: the order rows are read in
    num_rows: int
    columns: list[str]
    tasks: set[str]  # tasks present, after job defaults
    filesystem: fsspec.AbstractFileSystem


def _type_ok(kind: str, t: pa.DataType) -> bool:
    if kind == "string":
        return pa.types.is_string(t) or pa.types.is_large_string(t)
    if kind == "list":
        return pa.types.is_list(t) and pa.types.is_struct(t.value_type) and "weight" in [f.name for f in t.value_type]
    if kind == "binary":
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)
    if kind == "integer":
        return pa.types.is_integer(t)
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def find_files(location: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """A file, a directory (every *.parquet below it) or a glob -> sorted list of files."""
    fs, path = url_to_fs(location, storage_options)
    if any(ch in path for ch in "*?["):
        files = fs.glob(path)
    elif fs.isdir(path):
        files = [f for f in fs.find(path) if f.endswith(".parquet")]
    elif fs.exists(path):
        files = [path]
    else:
        raise ManifestError(f"manifest {location}: no such file or directory")
    if not files:
        raise ManifestError(f"manifest {location}: no Parquet files found")
    return fs, sorted(fs.unstrip_protocol(f) if "://" in location else f for f in files)


def validate_manifest(config: JobConfig) -> Manifest:
    fs, files = find_files(config.input.manifest, config.storage_options)
    allowed = supported_tasks(config.model, config.storage_options)  # reads the decoder's U-Net config only
    problems: list[str] = []
    first_seen: dict[str, str] = {}
    tasks: set[str] = set()
    total = 0
    columns: set[str] = set()
    for name in files:
        try:
            with fs.open(name, "rb") as f:
                parquet = pq.ParquetFile(f)
                # Only the columns checked here: the manifest may also carry large image bytes.
                # Inline image bytes are read too (for the has-an-input check) but stay in Arrow buffers.
                wanted = [c for c in (*REQUIRED, *OPTIONAL) if c in parquet.schema_arrow.names]
                table = parquet.read(columns=wanted)
                columns.update(parquet.schema_arrow.names)
        except Exception as exc:  # unreadable / not Parquet
            problems.append(f"{name}: cannot read as Parquet ({type(exc).__name__}: "
                            f"{redact(str(exc), config.storage_options)})")
            continue
        total += table.num_rows
        tasks.update(table.column("task").drop_null().unique().to_pylist() if "task" in table.column_names else [])
        if "task" not in table.column_names or table.column("task").null_count:
            tasks.add(config.defaults.task)
        problems += _check_table(name, table, config, first_seen, allowed)
    if problems:
        shown = problems[:MAX_REPORTED]
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise ManifestError("invalid manifest:\n  " + "\n  ".join(shown) + more)
    if total == 0:
        raise ManifestError(f"manifest {config.input.manifest}: no rows")
    return Manifest(files=files, num_rows=total, columns=sorted(columns), tasks=tasks, filesystem=fs)


def _check_table(
    name: str, table: pa.Table, config: JobConfig, first_seen: dict[str, str], allowed: tuple[str, ...]
) -> list[str]:
    problems = []
    schema = table.schema
    for column in REQUIRED:
        if column not in schema.names:
            problems.append(f"{name}: missing required column '{column}'")
    for column, kind in {**REQUIRED, **OPTIONAL}.items():
        if column in schema.names and not _type_ok(kind, schema.field(column).type):
            problems.append(f"{name}: column '{column}' must be {kind}, got {schema.field(column).type}")
    if problems or "id" not in schema.names:
        return problems

    ids = table.column("id").to_pylist()
    for row, row_id in enumerate(ids):
        if row_id is None or row_id == "":
            problems.append(f"{name}: column 'id' is null or empty at row {row}")
        elif row_id in first_seen:
            problems.append(f"{name}: duplicate id {row_id!r} (first in {first_seen[row_id]})")
        else:
            first_seen[row_id] = name
    for row in _null_rows(table, "prompt"):
        problems.append(f"{name}: column 'prompt' is null at id {ids[row]!r}")
    for column, low in MINIMUM.items():
        if column in schema.names:
            bad = pc.less(table.column(column), low).to_pylist()
            problems += [
                f"{name}: column '{column}' must be >= {low}, got {table.column(column)[r].as_py()} at id {ids[r]!r}"
                for r, is_bad in enumerate(bad) if is_bad
            ]
    problems += _check_tasks(name, table, config, ids, allowed)
    if config.output.size_policy == "reject":
        for column in ("width", "height"):
            values = table.column(column).to_pylist() if column in schema.names else [None] * len(ids)
            default = getattr(config.defaults, column)
            problems += [
                f"{name}: column '{column}' is {v if v is not None else default}, not a multiple of 64 "
                f"(output.size_policy=reject) at id {ids[r]!r}"
                for r, v in enumerate(values) if (v if v is not None else default) % 64
            ]
    return problems


def _check_tasks(name: str, table: pa.Table, config: JobConfig, ids: list, allowed: tuple[str, ...]) -> list[str]:
    schema = table.schema
    tasks = table.column("task").to_pylist() if "task" in schema.names else [None] * len(ids)
    tasks = [t if t is not None else config.defaults.task for t in tasks]
    problems = []
    for r, task in enumerate(tasks):
        if task not in TASKS:
            problems.append(f"{name}: column 'task' is {task!r}, expected one of {TASKS}, at id {ids[r]!r}")
        elif task not in allowed:
            problems.append(f"{name}: task {task!r} needs another decoder than model.decoder={config.model.decoder!r} "
                            f"(which runs {', '.join(allowed)}), at id {ids[r]!r}")
    if "strength" in schema.names:
        problems += [f"{name}: column 'strength' must be within [0, 1], got {v} at id {ids[r]!r}"
                     for r, v in enumerate(table.column("strength").to_pylist()) if v is not None and not 0 <= v <= 1]
    present = {}
    for kind in ("image", "mask", "hint"):
        present[kind] = [False] * len(ids)
        for column in (f"{kind}_uri", f"{kind}_bytes"):
            if column in schema.names:
                present[kind] = [p or v for p, v in zip(present[kind], pc.is_valid(table.column(column)).to_pylist())]
        problems += [f"{name}: task {t!r} needs a '{kind}_uri' or '{kind}_bytes' value, missing at id {ids[r]!r}"
                     for r, t in enumerate(tasks) if kind in TASK_INPUTS.get(t, ()) and not present[kind][r]]
    problems += [f"{name}: task 'controlnet' needs a hint (hint_uri/hint_bytes) or an image to estimate depth "
                 f"from (image_uri/image_bytes), missing at id {ids[r]!r}"
                 for r, t in enumerate(tasks) if t == "controlnet" and not (present["hint"][r] or present["image"][r])]
    mixes = table.column("mix").to_pylist() if "mix" in schema.names else [None] * len(ids)
    for r, (task, mix) in enumerate(zip(tasks, mixes)):
        if task != "mix":
            continue
        if not mix:
            problems.append(f"{name}: task 'mix' needs a non-empty 'mix' list, missing at id {ids[r]!r}")
        for n, item in enumerate(mix or []):
            sources = [k for k in ("text", "image_uri", "image_bytes") if item.get(k) is not None]
            if len(sources) != 1 or item.get("weight") is None:
                problems.append(f"{name}: column 'mix' item {n} needs exactly one of text, image_uri, image_bytes "
                                f"and a weight, at id {ids[r]!r}")
    return problems


def _null_rows(table: pa.Table, column: str) -> list[int]:
    mask = pc.is_null(table.column(column)).to_pylist()
    return [r for r, is_null in enumerate(mask) if is_null]
