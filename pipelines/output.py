"""The output layout and its commit protocol: what makes a rerun resume exactly once.

    PATH/_RUN.json                                  run fingerprint and config (written before any shard)
    PATH/_LEASE.json                                who runs the job now (jobs/lease.py)
    PATH/data/{file}/part-{start:012d}-{digest}-a{K}.parquet (or .tar, output.format webdataset)
                                                    rows of the unit at row `start` of manifest file
                                                    `file` that succeeded at attempt K
    PATH/errors/{file}/part-{start:012d}-{digest}.parquet
                                                    rows of that unit still failing (latest attempt)
    PATH/_runs/{run}.json, {run}.parquet            one report per run that reached its end, and the
                                                    records (rows, bytes, sha256) of the shards it wrote
    PATH/_damaged/{run}/...                         shards found damaged, moved aside (never read)
    PATH/_retired/{run}/...                         shards of a manifest file that is gone, moved aside
                                                    because its ids are in the manifest again (never read)
    PATH/_manifests/{file}-{identity}.parquet       Parquet copies of CSV/TSV/JSONL manifest files
                                                    (kandinsky_engine/text_manifest.py)
    PATH/_files.parquet                             the manifest files whose units the output holds: folder
                                                    key, relative path, identity, rows (pipelines/sources.py)
    PATH/_index.parquet                             every shard's record, written before the summary
    PATH/_SUCCESS.json                              written after the output passed its check
    PATH/README.md, PATH/shards.txt                 the dataset card (Hugging Face `datasets` configs and
                                                    features) and the list of data shards, rewritten after
                                                    each _SUCCESS.json (pipelines/card.py)

A unit is a row range of one manifest file (kandinsky_engine/units.py); `{file}` is that file's
folder key and `digest` covers the file's identity and the range, so a shard names the exact rows
it was computed from, and a folder holds one file's shards (no prefix holds millions of objects).
Attempt 1 runs all the unit's rows and always writes its data shard, even an empty one: that
shard is the unit's commit mark. It writes errors first, then data, so a unit with a data shard
has its failures recorded. A later run retries only the rows of committed units that are in no
data shard (attempt K >= 2, one more than the latest attempt in the unit's data or errors shards,
writes the rows that now succeed, then replaces or removes the errors shard). Every file (metadata
included) is written under _tmp/ and moved into place, so readers never see a torn file, and names
depend on the unit, its digest and the attempt only, so a retried write task rewrites the same
file, with the same rows, instead of adding a duplicate.

A retried write task gets the same blocks and so writes the same bytes. The bytes of a unit's
shard can differ only where the unit itself was computed twice (its rows' `created_at` is when its
images were made, pipelines/sink.py): a block Ray had to recompute, or processes of a killed run
still writing a unit that the rerun computes too. Nothing relies on the bytes being the same: the
sink's records come from the task that succeeded, which wrote last (a move replaces the file whole);
a shard that a killed run left without a record is read back and hashed; and a data shard whose
bytes differ from its record (a late write after the unit was recorded) is found by size at the next
run, or by sha256 with `verify` and `run --check-shards`, and its unit is computed again: its rows,
the same ones, are neither lost nor doubled.

How a run resumes from what it finds is in pipelines/reconcile.py.

Why not Ray Data's checkpointing (`DataContext.checkpoint_config`, Ray 2.60): it filters done
rows right after the read, by id, before our units are formed, so a resumed run would batch the
remaining rows differently (on CPU that changes pixels); it checkpoints every row the sink sees,
failed ones included, so failed rows would never be retried; and its two-phase commit only covers
`_FileDatasink`s, while this sink writes two datasets (data/ and errors/).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from kandinsky_engine.storage import ensure_dir, move_file

from .shards import FORMATS, format_of
from kandinsky_engine.units import unit_digest

DATA, ERRORS, TMP = "data", "errors", "_tmp"
DAMAGED = "_damaged"  # shards set aside as unreadable
RETIRED = "_retired"  # shards of gone manifest files set aside (pipelines/sources.py)
FILES = "_files.parquet"  # the registry of manifest files (pipelines/sources.py)
RUN_FILE, SUMMARY = "_RUN.json", "_SUCCESS.json"  # the fingerprint (jobs/resume.py), the summary (jobs/run.py)
RUNS = "_runs"  # one report per run (also those that ended with failed rows)
INDEX, LEASE = "_index.parquet", "_LEASE.json"
# Every entry a job writes under its output root, and so all that --overwrite may remove: the
# root itself may hold other files (a README, the manifest, a bucket's other keys). In removal
# order: the summary first (the output stops claiming to be complete), the run file last (a
# removal cut short still holds _RUN.json, so --overwrite can take it up again).
# report.html and _logs/ (`kandinsky-batch report`, the CLI's log of each run) describe the output.
REPORT, LOGS = "report.html", "_logs"
MANIFESTS = "_manifests"  # Parquet copies of CSV/TSV/JSONL manifests (kandinsky_engine/text_manifest.py)
# The dataset card and the shard list (pipelines/card.py): the card only while it carries the tool's
# marker, so a README.md a user wrote there is never removed or replaced.
CARD, SHARD_LIST = "README.md", "shards.txt"
OWNED_ENTRIES = (SUMMARY, CARD, SHARD_LIST, INDEX, REPORT, DATA, ERRORS, TMP, DAMAGED, RETIRED, RUNS, LOGS, FILES,
                 MANIFESTS, RUN_FILE)
# The output layout's version, in the fingerprint: an output of another version is another job.
# 2: rows carry model_revision, engine_version and created_at; WebDataset samples a .txt caption.
LAYOUT_VERSION = 2
DATA_SHARD = re.compile(r"part-(\d{12})-([0-9a-f]{16})-a(\d+)\.(parquet|tar)")
ERRORS_SHARD = re.compile(r"part-(\d{12})-([0-9a-f]{16})\.parquet")
# compute_s: the model-stage seconds of the unit's attempt that wrote the shard (null where unknown:
# a shard read back, an errors shard beside its data shard).
RECORD_SCHEMA = pa.schema([("file", pa.string()), ("rows", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string()),
                           ("compute_s", pa.float64())])


class LeaseLost(RuntimeError):
    """Another run took this run's lease while it ran: it stopped committing (the CLI exits 3)."""


def lease_owner(fs, root: str) -> str | None:
    """The owner id in the output's lease now (None if there is none or it is unreadable)."""
    fs.invalidate_cache(root)
    try:
        record = json.loads(fs.cat_file(f"{root}/{LEASE}"))
    except (FileNotFoundError, ValueError):
        return None
    return record.get("owner") if isinstance(record, dict) else None


def data_name(key: str, start: int, digest: str, attempt: int, output_format: str = "parquet") -> str:
    return f"{key}/part-{start:012d}-{digest}-a{attempt}.{FORMATS[output_format].ext}"


def errors_name(key: str, start: int, digest: str) -> str:
    return f"{key}/part-{start:012d}-{digest}.parquet"


def put_bytes(fs, root: str, relpath: str, payload: bytes, tmp_tag: str) -> None:
    """Write root/relpath through a temporary file under _tmp/ and a move.

    On local disk the move is a rename; on S3 a server-side copy, whose new object appears whole."""
    tmp = f"{root}/{TMP}/{tmp_tag}-{relpath.replace('/', '-')}"
    ensure_dir(fs, f"{root}/{TMP}")  # never s3fs's makedirs: it creates a missing bucket
    with fs.open(tmp, "wb") as f:
        f.write(payload)
    move_file(fs, tmp, f"{root}/{relpath}")


def put(fs, root: str, folder: str, name: str, table: pa.Table, tmp_tag: str) -> dict:
    """Write `table` as root/folder/name, in the format its extension names; returns its record
    (rows, bytes, sha256)."""
    payload = format_of(name).encode(table)
    put_bytes(fs, root, f"{folder}/{name}", payload, tmp_tag)
    return record_of(f"{folder}/{name}", payload, table.num_rows)


def put_json(fs, root: str, relpath: str, obj: dict, tmp_tag: str) -> None:
    put_bytes(fs, root, relpath, json.dumps(obj, indent=2).encode(), tmp_tag)


def record_of(file: str, payload: bytes, rows: int) -> dict:
    return {"file": file, "rows": rows, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def put_records(fs, root: str, relpath: str, records: list[dict], tmp_tag: str) -> None:
    """Shard records as a Parquet table: one row per shard, small at any scale."""
    sink = pa.BufferOutputStream()
    # Row groups of 64k records: `report` samples shards by reading a few groups, not a million records.
    pq.write_table(pa.Table.from_pylist(records, schema=RECORD_SCHEMA), sink, row_group_size=1 << 16)
    put_bytes(fs, root, relpath, sink.getvalue().to_pybytes(), tmp_tag)


def read_records(fs, path: str) -> list[dict]:
    with fs.open(path, "rb") as f:
        return pq.read_table(f).to_pylist()


def entries(fs, folder: str) -> list[dict]:
    """Every file below `folder` but hidden ones, freshly listed: s3fs caches listings (and with
    them ETags) per filesystem instance, and the driver's instance would otherwise still show data/
    as it was before the run wrote. Its invalidate_cache(path) drops the path and its parents only,
    not the per-file folders below it, so the whole cache goes. Hidden files (a name or folder
    below `folder` that starts with '.': `.DS_Store`, `._x` of macOS, editors' swap files) are
    skipped, as pyarrow and `datasets` skip them when they read data/."""
    fs.invalidate_cache()
    try:
        found = fs.find(folder, detail=True)
    except FileNotFoundError:
        return []
    base = fs._strip_protocol(folder).rstrip("/") + "/"
    return [e for e in found.values() if e.get("type") != "directory"
            and not any(part.startswith(".") for part in e["name"].removeprefix(base).split("/"))]


@dataclass
class Shard:
    file: str  # relative to the output root, e.g. data/m-0a1b2c3d4e5f/part-000000000032-<digest>-a1.parquet
    path: str  # full path on the filesystem
    key: str  # the manifest file's folder key
    start: int  # the unit's first row in that file
    digest: str
    attempt: int | None  # None for an errors shard
    size: int

    @property
    def unit(self) -> str:
        return f"{self.key}/{self.start}"


def parse_shard(fs_path: str, root: str, size: int) -> Shard | None:
    file = fs_path[len(root) + 1:] if fs_path.startswith(root + "/") else fs_path
    parts = file.split("/")
    if len(parts) != 3:
        return None
    folder, key, name = parts
    if folder == DATA and (m := DATA_SHARD.fullmatch(name)):
        return Shard(file, fs_path, key, int(m[1]), m[2], int(m[3]), size)
    if folder == ERRORS and (m := ERRORS_SHARD.fullmatch(name)):
        return Shard(file, fs_path, key, int(m[1]), m[2], None, size)
    return None


def expected_digest(files: dict, key: str, start: int, rows_per_block: int) -> str | None:
    """The digest the unit at `start` of the file with folder `key` has in this manifest (None if
    no such unit: the file is gone, or the range is not a unit of it)."""
    file = files.get(key)
    if file is None or start % rows_per_block or start >= file.num_rows:
        return None
    return unit_digest(file.relpath, file.identity, start, min(start + rows_per_block, file.num_rows))


