"""Manifest discovery, planning and validation, before any model loads.

The driver plans from file metadata only: each file's footer (row count, schema) and identity
(ETag on object stores, sha256 of the bytes on disk). Rows are checked by `check_file`, one file
at a time and streaming by record batch, returning only what failed; the job runs it as one Ray
task per file (pipelines/validate.py), `kandinsky-batch validate` in its own process. So the
driver's memory does not grow with the rows (only with the files and the rows that fail).

Two kinds of problems, both named by file, column and row id (or row number where the id itself
is bad):
- manifest-level (unreadable file, missing or mistyped column, null or duplicate id): the job
  cannot run, so it fails fast with every such problem listed together;
- row-level (a null prompt, a size below 1, a task the decoder cannot run, a missing input...):
  one bad row never kills a job. Such rows are carried in `Manifest.row_errors` and the pipeline
  sends them to errors/ like any other failed row.

Duplicate ids are found with bounded memory: every file's ids are hashed to 64 bits and the
hashes split into buckets by their top bits; each bucket (from all files) is checked on its own,
and only hashes seen twice are looked up again as strings, in a second pass over the id columns.
"""

from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from urllib.parse import urlsplit

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .columns import MIX_ITEM, OPTIONAL, REQUIRED, reserved_reason  # noqa: F401 (MIX_ITEM: re-exported)
from .config import JobConfig
from .families import supported_tasks
from .identity import file_identity, file_stamp  # noqa: F401 (file_stamp: re-exported for read tasks)
from .normalize import normalize, normalize_schema, not_utf8, text_ids
from .row_checks import check_rows, tasks_of
from .storage import access_checked, is_http, redact, redact_url, url_to_fs
from .text_manifest import MANIFEST_SUFFIXES, freeze, is_text
from .units import Unit, file_units

MAX_REPORTED = 20  # problems listed in one error; the count of the rest is given
BATCH_ROWS = 65536  # rows per record batch when a file is checked: the most a check holds at once
BUCKETS = 64  # duplicate-id check: hash buckets (each checked on its own)


class ManifestError(ValueError):
    """The manifest cannot be run; the message lists every problem found."""


@dataclass(frozen=True)
class ManifestFile:
    path: str  # as listed (fully qualified for remote stores)
    relpath: str  # relative to the manifest root: names the file's units
    identity: str  # ETag / checksum on object stores, sha256 of the bytes on disk
    size: int
    num_rows: int
    stamp: tuple = ()  # what a read task compares to be sure the file did not change (file_stamp)
    frozen: bool = False  # `path` is the Parquet copy of a CSV/TSV/JSONL source (text_manifest.py)


@dataclass
class Manifest:
    files: list[ManifestFile]  # sorted: the order rows are read in
    tasks: set[str]  # tasks of the valid rows, after job defaults
    filesystem: fsspec.AbstractFileSystem
    row_errors: dict[str, str] = field(default_factory=dict)  # id -> "file: column ...: problem"
    schema: pa.Schema = field(default_factory=lambda: pa.schema([]))  # all files' columns, unified

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    @property
    def columns(self) -> list[str]:
        return sorted(self.schema.names)

    def units(self, rows_per_block: int) -> list[list[Unit]]:
        """Every unit, by file, in manifest order."""
        return [file_units(f.relpath, f.identity, f.num_rows, rows_per_block) for f in self.files]


@dataclass
class FileCheck:
    """What `check_file` found in one file: only what failed, and its ids' hashes."""

    problems: list[str] = field(default_factory=list)  # manifest-level
    row_errors: dict[str, str] = field(default_factory=dict)
    tasks: set[str] = field(default_factory=set)
    hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # one per non-null id


def _type_ok(kind: str, t: pa.DataType, column: str = "") -> bool:
    """Whether a column of type `t` can be read as `kind` (kandinsky_engine/normalize.py: integer ids
    are text, whole-number floats are integers)."""
    if kind == "string":
        return pa.types.is_string(t) or pa.types.is_large_string(t) or (column == "id" and pa.types.is_integer(t))
    if kind == "list":
        return pa.types.is_list(t) and pa.types.is_struct(t.value_type) and "weight" in [f.name for f in t.value_type]
    if kind == "binary":
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)
    return pa.types.is_integer(t) or pa.types.is_floating(t)  # "integer" too: whole numbers are checked per row


# How to fix a column of a type the engine cannot read, with pandas (how most manifests are made).
FIXES = {"string": "write it as text, e.g. df[{c!r}] = df[{c!r}].astype('string')",
         "integer": "write it as numbers, e.g. df[{c!r}] = pd.to_numeric(df[{c!r}]).astype('Int64')",
         "number": "write it as numbers, e.g. df[{c!r}] = pd.to_numeric(df[{c!r}])",
         "binary": "write the encoded bytes (PNG/JPEG), e.g. df[{c!r}] = [open(p, 'rb').read() for p in paths]",
         "list": "write a list of {{text, image_uri, image_bytes, weight}} items per row"}


def find_files(location: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """A file, a directory (every *.parquet, *.csv, *.tsv, *.jsonl and *.ndjson below it) or a glob
    -> sorted list of files.

    An http(s) URL is one file (a signed URL's query is part of it, never shown: redact_url).
    A path that exists is taken as given, even with glob characters in it (`run[1]/m.parquet`).
    In a directory, names below it that start with '_' or '.' are skipped, as Spark and pyarrow
    do: `_tmp/`, `_SUCCESS`, `.DS_Store`, a job output's `_damaged/`.
    Refused access (403) raises StorageAccessError naming the manifest, before any model loads."""
    fs, path = url_to_fs(location, storage_options)
    fs.invalidate_cache()  # filesystem instances are shared: a prefix may have grown since the last listing
    with access_checked(location, storage_options, "listing manifest"):
        if is_http(fs):
            if not fs.exists(path):
                raise ManifestError(f"manifest {redact_url(location)}: no such file (HTTP HEAD found nothing)")
            return fs, [location]
        if fs.isdir(path):
            files = [f for f in fs.find(path) if f.lower().endswith(MANIFEST_SUFFIXES)
                     and not any(part.startswith(("_", ".")) for part in PurePosixPath(f).relative_to(path).parts)]
        elif fs.exists(path):
            files = [path]
        elif glob.has_magic(path):
            files = fs.glob(path)
        else:
            raise ManifestError(f"manifest {redact_url(location)}: no such file or directory")
    if not files:
        raise ManifestError(f"manifest {redact_url(location)}: no manifest files found (*.parquet, *.csv, *.tsv, "
                            "*.jsonl, *.ndjson)")
    return fs, sorted(fs.unstrip_protocol(f) if "://" in location else f for f in files)


def manifest_root(location: str, fs, path: str) -> str:
    """The folder that files' relative paths are taken from: a directory manifest itself, a single
    file's folder, or the part of a glob before its first wildcard."""
    if fs.isdir(path):
        return path.rstrip("/")
    if fs.exists(path) or not glob.has_magic(path):
        return path.rsplit("/", 1)[0] if "/" in path else ""
    fixed = []
    for part in path.split("/"):
        if glob.has_magic(part):
            break
        fixed.append(part)
    return "/".join(fixed)


def unified_schema(schemas: dict[str, pa.Schema]) -> pa.Schema:
    """The manifest's schema from plan_files' schemas; raises ManifestError if files disagree."""
    problems: list[str] = []
    schema = _unified(schemas, problems)
    if problems:
        raise ManifestError("invalid manifest:\n  " + "\n  ".join(problems))
    return schema


def plan_files(config: JobConfig, rehash: bool = False
               ) -> tuple[fsspec.AbstractFileSystem, list[ManifestFile], dict[str, pa.Schema], list[str]]:
    """Every manifest file with its footer's row count and schema and its identity; the rows are
    not read. Returns (filesystem, files, schema by file, problems). `rehash`: identify local
    files by their bytes, not the digest cache (verify)."""
    fs, files = find_files(config.input.manifest, config.storage_options)
    _, path = url_to_fs(config.input.manifest, config.storage_options)
    root = None if is_http(fs) else manifest_root(config.input.manifest, fs, path)
    planned, schemas, problems = [], {}, []
    for name in files:
        if root is None:  # a URL: its file name, never its query (a signed URL's changes with each signing)
            relpath = urlsplit(name).path.rsplit("/", 1)[-1] or "manifest"
        else:
            stripped = fs._strip_protocol(name)
            relpath = stripped[len(root) + 1:] if root and stripped.startswith(root + "/") else stripped.rsplit("/", 1)[-1]
        try:
            with access_checked(name, config.storage_options, "reading manifest"):
                info = fs.info(name)
                identity = file_identity(fs, name, info, config.model.cache_dir, config.model.digest_max_age_s, rehash)
                path, read_fs = name, fs
                if is_text(name):  # a CSV/TSV/JSONL source: its Parquet copy is what runs (text_manifest.py)
                    path, read_fs = freeze(fs, name, relpath, identity, config.model.cache_dir), url_to_fs("/")[0]
                    info = read_fs.info(path)
                with read_fs.open(path, "rb") as f:
                    meta = pq.ParquetFile(f)  # the footer only
                    schemas[name], rows = normalize_schema(meta.schema_arrow), meta.metadata.num_rows
        except PermissionError:  # a storage (credentials) problem, not a manifest one: stop here
            raise
        except Exception as exc:  # unreadable / not Parquet (e.g. a local file still being written)
            reason = (str(exc) if is_text(name) and isinstance(exc, ValueError) else
                      f"cannot read as Parquet ({type(exc).__name__}: {exc})")
            problems.append(f"{redact_url(name)}: {redact(reason, config.storage_options)}")
            continue
        planned.append(ManifestFile(path, relpath, identity, int(info.get("size") or 0), rows,
                                    file_stamp(read_fs, path, info), frozen=path != name))
    return fs, planned, schemas, problems


def id_hashes(ids: list) -> np.ndarray:
    """64-bit hashes of ids (null ids skipped): the same in every process (not Python's hash())."""
    return np.array([int.from_bytes(hashlib.blake2b(i.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
                     for i in ids if i is not None], dtype=np.uint64)


def check_file(file: ManifestFile, config: JobConfig, allowed: tuple[str, ...]) -> FileCheck:
    """Every check of one file, streaming by record batch; returns only what failed."""
    fs, _ = url_to_fs(file.path, config.storage_options)
    name, check = redact_url(file.path), FileCheck()
    with access_checked(file.path, config.storage_options, "reading manifest"), fs.open(file.path, "rb") as f:
        parquet = pq.ParquetFile(f)
        check.problems = _check_schema(name, parquet.schema_arrow) + _check_names(name, parquet.schema_arrow)
        if check.problems:
            return check
        # Only the columns checked here: the manifest may also carry other large columns.
        wanted = [c for c in (*REQUIRED, *OPTIONAL) if c in parquet.schema_arrow.names]
        offset, hashes = 0, []
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
            table = pa.Table.from_batches([batch])
            if text := not_utf8(name, table, offset):  # the file itself is corrupt there
                check.problems += text
                return check
            table, unreadable = normalize(table, file.path)
            ids = table.column("id").to_pylist()
            check.problems += [f"{name}: column 'id' is null or empty at row {offset + r}"
                               for r, i in enumerate(ids) if i is None or i == ""][:MAX_REPORTED]
            hashes.append(id_hashes(ids))
            bad = check_rows(name, table, config, ids, allowed)
            for r, problem in unreadable:
                bad.setdefault(ids[r], f"{name}: {problem} at id {ids[r]!r}")
            check.row_errors.update(bad)
            check.tasks.update(t for i, t in zip(ids, tasks_of(table, config)) if i not in bad)
            offset += table.num_rows
    check.hashes = np.concatenate(hashes) if hashes else check.hashes
    return check


def bucket_of(hashes: np.ndarray) -> np.ndarray:
    return (hashes >> np.uint64(64 - 6)).astype(np.int64) % BUCKETS


def colliding(hashes: list[np.ndarray]) -> np.ndarray:
    """Hashes that occur more than once among the given arrays (one bucket's, from every file)."""
    merged = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    values, counts = np.unique(merged, return_counts=True)
    return values[counts > 1]


def check_locally(files: list[ManifestFile], config: JobConfig, allowed: tuple[str, ...]):
    """`check_file` on every file in this process; (checks, colliding hashes)."""
    checks = [check_file(f, config, allowed) for f in files]
    buckets = [[c.hashes[bucket_of(c.hashes) == b] for c in checks] for b in range(BUCKETS)]
    collisions = np.concatenate([colliding(bucket) for bucket in buckets])
    for c in checks:
        c.hashes = np.zeros(0, np.uint64)
    return checks, collisions


def duplicate_problems(files: list[ManifestFile], collisions: np.ndarray, config: JobConfig) -> list[str]:
    """The second pass: ids whose hash collided, compared as strings, named with their files."""
    if not len(collisions):
        return []
    wanted, first_seen, problems = set(int(h) for h in collisions), {}, []
    for file in files:
        fs, _ = url_to_fs(file.path, config.storage_options)
        with fs.open(file.path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=["id"]):
                ids = [i for i in text_ids(batch.column(0)) if i is not None]
                for row_id, h in zip(ids, id_hashes(ids)):
                    if int(h) not in wanted:
                        continue
                    if row_id in first_seen:
                        problems.append(f"{redact_url(file.path)}: duplicate id {row_id!r} (first in {first_seen[row_id]})")
                    else:
                        first_seen[row_id] = redact_url(file.path)
    return problems


def validate_manifest(config: JobConfig, checker=None, planned=None, rehash: bool = False) -> Manifest:
    """Plan the manifest and check every row. `checker(files, config, allowed)` runs `check_file`
    on every file and finds colliding id hashes: in this process by default, as Ray tasks in a job
    (pipelines/validate.py). `planned`: plan_files' result, if the caller has it already."""
    fs, files, schemas, problems = planned or plan_files(config, rehash)
    problems = list(problems)
    allowed = supported_tasks(config.model, config.storage_options)  # reads the decoder's U-Net config only
    checks, collisions = (checker or check_locally)(files, config, allowed)
    row_errors, tasks = {}, set()
    for check in checks:
        problems += check.problems
        row_errors.update(check.row_errors)
        tasks |= check.tasks
    schema = _unified(schemas, problems)
    if not problems:
        problems += duplicate_problems(files, collisions, config)
    if problems:
        shown = problems[:MAX_REPORTED]
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise ManifestError("invalid manifest:\n  " + "\n  ".join(shown) + more)
    if not sum(f.num_rows for f in files):
        raise ManifestError(f"manifest {config.input.manifest}: no rows")
    return Manifest(files=files, tasks=tasks, filesystem=fs, row_errors=row_errors, schema=schema)


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
                        + ", ".join(map(redact_url, schemas)))
        return pa.schema([])


def _check_schema(name: str, schema: pa.Schema) -> list[str]:
    """Manifest-level problems: the job cannot run (or cannot name its rows) until they are fixed."""
    problems = [f"{name}: missing required column '{column}'" for column in REQUIRED if column not in schema.names]
    for column, kind in {**REQUIRED, **OPTIONAL}.items():
        if column in schema.names and not _type_ok(kind, schema.field(column).type, column):
            problems.append(f"{name}: column '{column}' must be {kind}, got {schema.field(column).type}; "
                            + FIXES[kind].format(c=column))
    return problems
