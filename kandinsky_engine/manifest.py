"""Manifest discovery and validation, run in the driver before any model loads.

Two kinds of problems, both named by file, column and row id (or row number where the id itself
is bad):
- manifest-level (unreadable file, missing or mistyped column, null or duplicate id): the job
  cannot run, so it fails fast with every such problem listed together;
- row-level (a null prompt, a size below 1, a task the decoder cannot run, a missing input...):
  one bad row never kills a job. Such rows are carried in `Manifest.row_errors` and the pipeline
  sends them to errors/ like any other failed row.
"""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .columns import MIX_ITEM, OPTIONAL, REQUIRED, reserved_reason  # noqa: F401 (MIX_ITEM: re-exported)
from .config import TASKS, JobConfig
from .inputs import INPUTS, inputs_used
from .models import supported_tasks
from .rows import INT64_MAX, strength_start
from .storage import access_checked, redact, url_to_fs
from .units import UnitDigests
from .uri_policy import UriPolicy, UriRefused

# Inputs each task needs, each given as `{input}_uri` or `{input}_bytes`.
TASK_INPUTS = {"img2img": ("image",), "inpaint": ("image", "mask"), "variation": ("image",),
               "controlnet_img2img": ("image",)}
MINIMUM = {"seed": 0, "width": 1, "height": 1, "num_inference_steps": 1, "prior_num_inference_steps": 1}
MAX_REPORTED = 20  # problems listed in one error; the count of the rest is given


class ManifestError(ValueError):
    """The manifest cannot be run; the message lists every problem found."""


@dataclass
class Manifest:
    files: list[str]  # fully qualified paths, sorted: the order rows are read in
    num_rows: int
    columns: list[str]
    tasks: set[str]  # tasks of the valid rows, after job defaults
    filesystem: fsspec.AbstractFileSystem
    ids: list[str] = field(default_factory=list)  # every id, in read order: units are cut from it
    row_errors: dict[str, str] = field(default_factory=dict)  # id -> "file: column ...: problem"
    schema: pa.Schema = field(default_factory=lambda: pa.schema([]))  # all files' columns, unified
    unit_digests: list[str] | None = None  # one per unit of `rows_per_block` rows (see units.py)


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
    """A file, a directory (every *.parquet below it) or a glob -> sorted list of files.

    A path that exists is taken as given, even with glob characters in it (`run[1]/m.parquet`).
    In a directory, names below it that start with '_' or '.' are skipped, as Spark and pyarrow
    do: `_tmp/`, `_SUCCESS`, `.DS_Store`, a job output's `_damaged/`.
    Refused access (403) raises StorageAccessError naming the manifest, before any model loads."""
    fs, path = url_to_fs(location, storage_options)
    with access_checked(location, storage_options, "listing manifest"):
        if fs.isdir(path):
            files = [f for f in fs.find(path) if f.endswith(".parquet")
                     and not any(part.startswith(("_", ".")) for part in PurePosixPath(f).relative_to(path).parts)]
        elif fs.exists(path):
            files = [path]
        elif glob.has_magic(path):
            files = fs.glob(path)
        else:
            raise ManifestError(f"manifest {location}: no such file or directory")
    if not files:
        raise ManifestError(f"manifest {location}: no Parquet files found")
    return fs, sorted(fs.unstrip_protocol(f) if "://" in location else f for f in files)


def validate_manifest(config: JobConfig, *, digests: bool = True) -> Manifest:
    """Check every file; with `digests`, also read every column once more to digest each unit's
    rows (see units.py): what a resume compares committed shards against."""
    fs, files = find_files(config.input.manifest, config.storage_options)
    allowed = supported_tasks(config.model, config.storage_options)  # reads the decoder's U-Net config only
    problems: list[str] = []
    row_errors: dict[str, str] = {}
    first_seen: dict[str, str] = {}
    tasks: set[str] = set()
    ids: list[str] = []
    schemas: dict[str, pa.Schema] = {}
    hasher = UnitDigests(config.rows_per_block())
    for name in files:
        try:
            with access_checked(name, config.storage_options, "reading manifest"), fs.open(name, "rb") as f:
                parquet = pq.ParquetFile(f)
                # Only the columns checked here: the manifest may also carry large image bytes.
                # Inline image bytes are read too (for the has-an-input check) but stay in Arrow buffers.
                wanted = [c for c in (*REQUIRED, *OPTIONAL) if c in parquet.schema_arrow.names]
                table = parquet.read(columns=wanted)
                schemas[name] = parquet.schema_arrow
                fatal = _check_schema(name, table, first_seen) + _check_names(name, parquet.schema_arrow)
                if digests and not fatal and not problems:
                    # Streamed by record batch: one batch of rows in memory at a time.
                    for batch in parquet.iter_batches(batch_size=4096):
                        for row in batch.to_pylist():
                            hasher.add(row)
        except PermissionError:  # a storage (credentials) problem, not a manifest one: stop here
            raise
        except Exception as exc:  # unreadable / not Parquet
            problems.append(f"{name}: cannot read as Parquet ({type(exc).__name__}: "
                            f"{redact(str(exc), config.storage_options)})")
            continue
        problems += fatal
        if fatal:
            continue
        file_ids = table.column("id").to_pylist()
        ids += file_ids
        bad = _check_rows(name, table, config, file_ids, allowed)
        row_errors.update(bad)
        tasks.update(t for i, t in zip(file_ids, _tasks(table, config)) if i not in bad)
    schema = _unified(schemas, problems)
    if problems:
        shown = problems[:MAX_REPORTED]
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise ManifestError("invalid manifest:\n  " + "\n  ".join(shown) + more)
    if not ids:
        raise ManifestError(f"manifest {config.input.manifest}: no rows")
    return Manifest(files=files, num_rows=len(ids), columns=sorted(schema.names), tasks=tasks, filesystem=fs,
                    ids=ids, row_errors=row_errors, schema=schema, unit_digests=hasher.digests() if digests else None)


def _check_names(name: str, schema: pa.Schema) -> list[str]:
    """Columns that would collide with the engine's own (they would be overwritten or dropped)."""
    return [f"{name}: column '{column}' {reason}" for column in schema.names
            if (reason := reserved_reason(column)) is not None]


def _unified(schemas: dict[str, pa.Schema], problems: list[str]) -> pa.Schema:
    """One schema for all files (a column missing from some files is null there); the output's
    pass-through columns take their types from it."""
    try:
        return pa.unify_schemas(list(schemas.values()), promote_options="permissive") if schemas else pa.schema([])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        problems.append(f"the manifest files disagree on a column's type ({exc}); files: "
                        + ", ".join(schemas))
        return pa.schema([])


def _check_schema(name: str, table: pa.Table, first_seen: dict[str, str]) -> list[str]:
    """Manifest-level problems: the job cannot run (or cannot name its rows) until they are fixed."""
    problems = []
    schema = table.schema
    for column in REQUIRED:
        if column not in schema.names:
            problems.append(f"{name}: missing required column '{column}'")
    for column, kind in {**REQUIRED, **OPTIONAL}.items():
        if column in schema.names and not _type_ok(kind, schema.field(column).type):
            problems.append(f"{name}: column '{column}' must be {kind}, got {schema.field(column).type}")
    if problems:
        return problems
    for row, row_id in enumerate(table.column("id").to_pylist()):
        if row_id is None or row_id == "":
            problems.append(f"{name}: column 'id' is null or empty at row {row}")
        elif row_id in first_seen:
            problems.append(f"{name}: duplicate id {row_id!r} (first in {first_seen[row_id]})")
        else:
            first_seen[row_id] = name
    return problems


def _tasks(table: pa.Table, config: JobConfig) -> list[str]:
    tasks = table.column("task").to_pylist() if "task" in table.column_names else [None] * table.num_rows
    return [t if t is not None else config.defaults.task for t in tasks]


def _check_rows(name: str, table: pa.Table, config: JobConfig, ids: list, allowed: tuple[str, ...]) -> dict[str, str]:
    """Row-level problems, id -> message (the first problem found for that row)."""
    found: list[tuple[int, str]] = []
    schema = table.schema
    found += [(r, "column 'prompt' is null") for r in _null_rows(table, "prompt")]
    for column, low in MINIMUM.items():
        if column in schema.names:
            values = table.column(column).to_pylist()
            found += [(r, f"column '{column}' must be >= {low}, got {v}")
                      for r, v in enumerate(values) if v is not None and v < low]
    if "seed" in schema.names:  # a uint64 column can hold seeds torch and the output's int64 cannot
        found += [(r, f"column 'seed' must be <= {INT64_MAX} (a signed 64-bit integer), got {v}")
                  for r, v in enumerate(table.column("seed").to_pylist()) if v is not None and v > INT64_MAX]
    if config.output.size_policy == "reject":
        for column in ("width", "height"):
            values = table.column(column).to_pylist() if column in schema.names else [None] * len(ids)
            default = getattr(config.defaults, column)
            found += [(r, f"column '{column}' is {v if v is not None else default}, not a multiple of 64 "
                       "(output.size_policy=reject)")
                      for r, v in enumerate(values) if (v if v is not None else default) % 64]
    found += _check_tasks(table, config, allowed)
    found += _check_values(table, config)
    found += _check_inputs(name, table, config)
    errors: dict[str, str] = {}
    for r, message in sorted(found, key=lambda f: f[0]):
        errors.setdefault(ids[r], f"{name}: {message} at id {ids[r]!r}")
    return errors


def _check_tasks(table: pa.Table, config: JobConfig, allowed: tuple[str, ...]) -> list[tuple[int, str]]:
    schema = table.schema
    tasks = _tasks(table, config)
    found = []
    for r, task in enumerate(tasks):
        if task not in TASKS:
            found.append((r, f"column 'task' is {task!r}, expected one of {TASKS},"))
        elif task not in allowed:
            found.append((r, f"column 'task': {task!r} needs another decoder than model.decoder="
                             f"{config.model.decoder!r} (which runs {', '.join(allowed)}),"))
    if "strength" in schema.names:
        found += [(r, f"column 'strength' must be within [0, 1], got {v}")
                  for r, v in enumerate(table.column("strength").to_pylist()) if v is not None and not 0 <= v <= 1]
    present = {}
    for kind in ("image", "mask", "hint"):
        present[kind] = [False] * len(tasks)
        for column in (f"{kind}_uri", f"{kind}_bytes"):
            if column in schema.names:
                present[kind] = [p or v for p, v in zip(present[kind], pc.is_valid(table.column(column)).to_pylist())]
        found += [(r, f"column '{kind}_uri': task {t!r} needs a '{kind}_uri' or '{kind}_bytes' value, missing")
                  for r, t in enumerate(tasks) if kind in TASK_INPUTS.get(t, ()) and not present[kind][r]]
    found += [(r, "column 'hint_uri': task 'controlnet' needs a hint (hint_uri/hint_bytes) or an image to "
                  "estimate depth from (image_uri/image_bytes), missing")
              for r, t in enumerate(tasks) if t == "controlnet" and not (present["hint"][r] or present["image"][r])]
    mixes = table.column("mix").to_pylist() if "mix" in schema.names else [None] * len(tasks)
    for r, (task, mix) in enumerate(zip(tasks, mixes)):
        if task != "mix":
            continue
        if not mix:
            found.append((r, "column 'mix': task 'mix' needs a non-empty 'mix' list, missing"))
        for n, item in enumerate(mix or []):
            sources = [k for k in ("text", "image_uri", "image_bytes") if item.get(k) is not None]
            if len(sources) != 1 or item.get("weight") is None:
                found.append((r, f"column 'mix' item {n} needs exactly one of text, image_uri, image_bytes "
                                 "and a weight,"))
    return found


LIMITS = {"width": "max_side", "height": "max_side", "num_inference_steps": "max_steps",
          "prior_num_inference_steps": "max_steps"}  # column -> its upper bound in config.input
FINITE = ("guidance_scale", "prior_guidance_scale", "strength")
# Tasks whose `strength` cuts a schedule short, and the steps column of that schedule.
STRENGTH_STEPS = {"img2img": "num_inference_steps", "controlnet_img2img": "num_inference_steps",
                  "variation": "prior_num_inference_steps"}


def _resolved(table: pa.Table, config: JobConfig, column: str) -> list:
    """A parameter column as the stages see it: the row's value, else the job default."""
    default = getattr(config.defaults, column)
    values = table.column(column).to_pylist() if column in table.column_names else [None] * table.num_rows
    return [default if v is None else v for v in values]


def _check_values(table: pa.Table, config: JobConfig) -> list[tuple[int, str]]:
    """Parameter values (the row's, else the job default's) that always fail at run time, or that
    would hold a job for hours: steps and sizes above the configured limits, fewer than 2 prior
    steps, NaN or infinite numbers, and a strength that leaves no step to run."""
    values = {c: _resolved(table, config, c) for c in (*LIMITS, *FINITE, "strength")}
    found = []
    for column, limit in LIMITS.items():
        bound = getattr(config.input, limit)
        found += [(r, f"column '{column}' is {v}, above input.{limit}={bound}")
                  for r, v in enumerate(values[column]) if v > bound]
    found += [(r, f"column 'prior_num_inference_steps' must be >= 2 (diffusers' UnCLIPScheduler divides by "
                  f"steps - 1), got {v}") for r, v in enumerate(values["prior_num_inference_steps"]) if v < 2]
    for column in FINITE:
        found += [(r, f"column '{column}' must be a finite number, got {v}")
                  for r, v in enumerate(values[column]) if not math.isfinite(v)]
    for r, task in enumerate(_tasks(table, config)):
        steps_column, strength = STRENGTH_STEPS.get(task), values["strength"][r]
        if steps_column is None or not 0 <= strength <= 1:  # NaN and out-of-range strengths are reported above
            continue
        steps = values[steps_column][r]
        try:
            strength_start(steps, strength)  # the stages' own rule, so validation agrees with the run
        except ValueError:
            found.append((r, f"column 'strength': {strength} x {steps} {steps_column} leaves no step to run "
                             f"(task {task!r} runs int(steps x strength) steps)"))
    return found


def _check_inputs(name: str, table: pa.Table, config: JobConfig) -> list[tuple[int, str]]:
    """The inputs each row's task uses (inputs.inputs_used): URIs the input policy refuses, and inline
    bytes above input.max_input_bytes. An input the task does not use is never read, so it is no
    error. Files are not opened here: a missing or oversized file fails when it is fetched."""
    policy = UriPolicy.for_manifest(config.input.manifest, name, config.input.allowed_uri_prefixes)
    limit = config.input.max_input_bytes

    def problem(uri: str | None, size: int | None) -> tuple[str, str] | None:
        """(which cell, reason) of an input given as a URI and/or inline bytes of `size`."""
        if size is not None:  # inline bytes win over a URI, as in fetch_inputs
            return ("bytes", f"{size} bytes is larger than input.max_input_bytes={limit}") if size > limit else None
        try:
            if uri is not None:
                policy.check(uri)
        except UriRefused as exc:
            return "uri", str(exc)
        return None

    def cells(column: str, sizes: bool = False) -> list:
        if column not in table.column_names:
            return [None] * table.num_rows
        return (pc.binary_length(table.column(column)) if sizes else table.column(column)).to_pylist()

    tasks = _tasks(table, config)
    hint_given = [u is not None or b is not None for u, b in zip(cells("hint_uri"), cells("hint_bytes", True))]
    found = []
    for kind in INPUTS:
        uris, sizes = cells(f"{kind}_uri"), cells(f"{kind}_bytes", sizes=True)
        for r, task in enumerate(tasks):
            if kind in inputs_used(task, hint_given[r]) and (bad := problem(uris[r], sizes[r])):
                found.append((r, f"column '{kind}_{bad[0]}': {bad[1]}"))
    for r, (task, mix) in enumerate(zip(tasks, cells("mix"))):
        for n, item in enumerate(mix if task == "mix" and mix else []):
            image = item.get("image_bytes")
            if bad := problem(item.get("image_uri"), None if image is None else len(image)):
                found.append((r, f"column 'mix' item {n} image_{bad[0]}: {bad[1]}"))
    return found


def _null_rows(table: pa.Table, column: str) -> list[int]:
    mask = pc.is_null(table.column(column)).to_pylist()
    return [r for r, is_null in enumerate(mask) if is_null]
