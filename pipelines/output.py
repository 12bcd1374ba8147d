"""The output layout and its commit protocol: what makes a rerun resume exactly once.

    PATH/_RUN.json                                  run fingerprint and config (written before any shard)
    PATH/_LEASE.json                                who runs the job now (jobs/lease.py)
    PATH/data/{file}/part-{start:012d}-{digest}-a{K}.parquet (or .tar, output.format webdataset)
                                                    rows of the unit at row `start` of manifest file
                                                    `file` that succeeded at attempt K
    PATH/errors/{file}/part-{start:012d}-{digest}.parquet
                                                    rows of that unit still failing (latest attempt)
    PATH/_runs/{run}.json, {run}.parquet            one report per run that reached its end, and the
                                                    records (rows, bytes, sha256) of its shards
    PATH/_damaged/{run}/...                         shards found damaged, moved aside (never read)
    PATH/_index.parquet                             every shard's record, written before the summary
    PATH/_SUCCESS.json                              written last, after the output passed its check

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
file with the same bytes instead of adding a duplicate.

Before a run, `inspect` compares the output with the manifest, read-only:
- a shard whose digest is not its unit's was computed from other rows (the file was rewritten):
  the run is refused, or with --recompute-changed the file's units are run again;
- a shard whose size differs from its record, or that is not readable Parquet, is damaged: it is
  moved to _damaged/ and its whole unit is run again (whole, so that its rows batch as before and
  no row of another attempt is duplicated);
- shards of a file no longer in the manifest are left alone and reported.

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
from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from kandinsky_engine.storage import ensure_dir, move_file, remove_file, remove_tree

from .shards import FORMATS, format_of
from kandinsky_engine.units import file_key, unit_digest

DATA, ERRORS, TMP = "data", "errors", "_tmp"
DAMAGED = "_damaged"  # shards set aside as unreadable
RUN_FILE, SUMMARY = "_RUN.json", "_SUCCESS.json"  # the fingerprint (jobs/resume.py), the summary (jobs/run.py)
RUNS = "_runs"  # one report per run (also those that ended with failed rows)
INDEX, LEASE = "_index.parquet", "_LEASE.json"
# Every entry a job writes under its output root, and so all that --overwrite may remove: the
# root itself may hold other files (a README, the manifest, a bucket's other keys). In removal
# order: the summary first (the output stops claiming to be complete), the run file last (a
# removal cut short still holds _RUN.json, so --overwrite can take it up again).
# report.html and _logs/ (`kandinsky-batch report`, the CLI's log of each run) describe the output.
REPORT, LOGS = "report.html", "_logs"
OWNED_ENTRIES = (SUMMARY, INDEX, REPORT, DATA, ERRORS, TMP, DAMAGED, RUNS, LOGS, RUN_FILE)
DATA_SHARD = re.compile(r"part-(\d{12})-([0-9a-f]{16})-a(\d+)\.(parquet|tar)")
ERRORS_SHARD = re.compile(r"part-(\d{12})-([0-9a-f]{16})\.parquet")
RECORD_SCHEMA = pa.schema([("file", pa.string()), ("rows", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string())])


def data_name(key: str, start: int, digest: str, attempt: int, output_format: str = "parquet") -> str:
    return f"{key}/part-{start:012d}-{digest}-a{attempt}.{FORMATS[output_format].ext}"


def errors_name(key: str, start: int, digest: str) -> str:
    return f"{key}/part-{start:012d}-{digest}.parquet"


def put_bytes(fs, root: str, relpath: str, payload: bytes, tmp_tag: str) -> None:
    """Write root/relpath through a temporary file under _tmp/ and a move.

    On local disk the move is a rename; on S3 a server-side copy, whose new object appears whole."""
    folder = relpath.rsplit("/", 1)[0] if "/" in relpath else ""
    tmp = f"{root}/{TMP}/{tmp_tag}-{relpath.replace('/', '-')}"
    ensure_dir(fs, f"{root}/{TMP}")  # never s3fs's makedirs: it creates a missing bucket
    if folder:
        ensure_dir(fs, f"{root}/{folder}")
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
    """Every file below `folder`, freshly listed: s3fs caches listings (and with them ETags) per
    filesystem instance, and the driver's instance would otherwise still show data/ as it was
    before the run wrote. Its invalidate_cache(path) drops the path and its parents only, not the
    per-file folders below it, so the whole cache goes."""
    fs.invalidate_cache()
    try:
        found = fs.find(folder, detail=True)
    except FileNotFoundError:
        return []
    return [e for e in found.values() if e.get("type") != "directory"]


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


@dataclass
class Inspection:
    """What a previous run left, read-only: shards by unit name, and what cannot be trusted."""

    data: dict[str, list[Shard]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, list[Shard]] = field(default_factory=lambda: defaultdict(list))
    foreign: list[str] = field(default_factory=list)  # files in data/ or errors/ not in the layout
    changed: dict[str, list[str]] = field(default_factory=dict)  # manifest file -> its units whose shards name other rows
    gone: dict[str, int] = field(default_factory=dict)  # folder key of a file no longer in the manifest -> shards
    damaged: list[Shard] = field(default_factory=list)
    records: dict[str, dict] = field(default_factory=dict)  # file -> record, for every healthy shard
    has_tmp: bool = False


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


def read_back(fs, shard: Shard, deep: bool, known: dict | None) -> dict | None:
    """The shard's record if it is healthy, else None. Trusted without reading when its record is
    known and the size matches (unless `deep`); otherwise read whole, parsed and hashed."""
    if known is not None and known["bytes"] == shard.size and not deep:
        return known
    try:
        payload = fs.cat_file(shard.path)
        rows = format_of(shard.file).decode(payload)[0]  # every page (member) decodes, not just the footer
    except Exception:  # truncated, garbage, vanished: not a shard any reader can use
        return None
    record = record_of(shard.file, payload, rows)
    if deep and known is not None and known["sha256"] != record["sha256"] and known["bytes"] == record["bytes"]:
        return None  # same size, other bytes: bit rot
    return record


def inspect(fs, root: str, files: list, rows_per_block: int, known: dict[str, dict], deep: bool = False) -> Inspection:
    """Compare the output with the manifest (`files`: ManifestFile). Changes nothing."""
    found = Inspection(has_tmp=fs.exists(f"{root}/{TMP}"))
    by_key = {file_key(f.relpath): f for f in files}
    for folder in (DATA, ERRORS):
        for entry in entries(fs, f"{root}/{folder}"):
            shard = parse_shard(entry["name"], root, int(entry.get("size") or 0))
            if shard is None:
                found.foreign.append(entry["name"][len(root) + 1:])
                continue
            if shard.key not in by_key:
                found.gone[shard.key] = found.gone.get(shard.key, 0) + 1
                continue
            (found.data if shard.attempt is not None else found.errors)[shard.unit].append(shard)
            if expected_digest(by_key, shard.key, shard.start, rows_per_block) != shard.digest:
                units = found.changed.setdefault(by_key[shard.key].relpath, [])
                if shard.unit not in units:
                    units.append(shard.unit)
                continue
            record = read_back(fs, shard, deep, known.get(shard.file))
            if record is None:
                found.damaged.append(shard)
            else:
                found.records[shard.file] = record
    return found


@dataclass
class FilePlan:
    """One manifest file's work in a run: its units below `stop` (the --limit), except those in
    `done`; units in `retry` run only their rows not in data/ yet."""

    file: object  # ManifestFile
    stop: int  # rows of the file the run covers
    done: set[int] = field(default_factory=set)  # committed units' starts, nothing left to do
    retry: dict[int, tuple[int, frozenset]] = field(default_factory=dict)  # start -> (attempt, ids already in data/)


@dataclass
class State:
    """The work still to do, and what the report needs to know."""

    plans: list[FilePlan] = field(default_factory=list)
    rows_done: int = 0  # rows already committed in data/ (skipped)
    rows_retried: int = 0  # rows committed as failed, run again
    rows_todo: int = 0  # rows this run computes (retried ones included)
    cleaned: list[str] = field(default_factory=list)  # stale files removed
    recomputed: list[str] = field(default_factory=list)  # units whose manifest rows changed, run again
    damaged: list[str] = field(default_factory=list)  # damaged shards moved to _damaged/


def _remove_unit(fs, found: Inspection, unit: str) -> list[str]:
    """Remove every shard of a unit: errors first and attempt 1 (the commit mark) last, so that a
    crash half way leaves the unit either still marked (and still detected) or uncommitted."""
    shards = found.errors.pop(unit, []) + sorted(found.data.pop(unit, []), key=lambda s: -s.attempt)
    for shard in shards:
        remove_file(fs, shard.path)
    return [s.file for s in shards]


def reconcile(fs, root: str, files: list, stops: list[int], rows_per_block: int, found: Inspection,
              tag: str) -> State:
    """Make the output consistent with the run's scope (`stops[i]`: the rows of `files[i]` it
    covers) and list the work left. Call only once the run is known to go ahead: it removes stale
    and damaged shards."""
    state = State()
    if found.has_tmp:  # pieces of writes that never finished
        state.cleaned.append(f"{TMP}/")
        remove_tree(fs, f"{root}/{TMP}")
    for units in found.changed.values():
        for unit in units:
            _remove_unit(fs, found, unit)
            state.recomputed.append(unit)
    for shard in found.damaged:
        if shard.unit not in found.data and shard.unit not in found.errors:
            continue  # removed with a changed unit
        if fs.exists(shard.path):
            target = f"{root}/{DAMAGED}/{tag}/{shard.file}"
            ensure_dir(fs, target.rsplit("/", 1)[0])
            move_file(fs, shard.path, target)
        state.damaged.append(shard.file)
        _remove_unit(fs, found, shard.unit)
    for file, stop in zip(files, stops):
        plan = FilePlan(file, stop)
        key = file_key(file.relpath)
        for start in range(0, stop, rows_per_block):
            rows = min(start + rows_per_block, file.num_rows) - start
            unit = f"{key}/{start}"
            shards, errors = found.data.get(unit, []), found.errors.get(unit, [])
            if not any(s.attempt == 1 for s in shards):
                # Not committed: anything else of it was written before a crash stopped the commit.
                state.cleaned += _remove_unit(fs, found, unit)
                state.rows_todo += rows
                continue
            counted = sum(found.records[s.file]["rows"] for s in shards + errors)
            if not errors and counted == rows:
                plan.done.add(start)
                state.rows_done += rows
                continue
            # Failed rows to retry, or rows in no shard at all (a shard or errors shard deleted by
            # hand): the rows of the unit that no data shard holds run again.
            done = set()
            for shard in shards:
                with fs.open(shard.path, "rb") as f:
                    done.update(format_of(shard.file).ids(f))
            pending = rows - len(done)
            state.rows_done += len(done)
            if not pending:  # the last attempt committed its rows but stopped before removing the errors
                for shard in errors:
                    remove_file(fs, shard.path)
                plan.done.add(start)
                continue
            state.rows_retried += pending
            state.rows_todo += pending
            # A retry in which every row failed again writes no data shard, only the errors shard
            # (with its attempt): without it the next run would number its attempt as that one's again.
            failed_at = []
            for shard in errors:
                with fs.open(shard.path, "rb") as f:
                    failed_at += pq.read_table(f, columns=["attempt"]).column("attempt").to_pylist()
            plan.retry[start] = (max([s.attempt for s in shards] + failed_at) + 1, frozenset(done))
        state.plans.append(plan)
    return state


def shard_records(fs, root: str, known: dict[str, dict]) -> list[dict]:
    """Every data and errors shard with rows, bytes and sha256, from a fresh listing. Records
    written or read by this or an earlier run (`known`, by file) are trusted when the size still
    matches; the rest are read back once."""
    records = []
    for folder in (DATA, ERRORS):
        for entry in sorted(entries(fs, f"{root}/{folder}"), key=lambda e: e["name"]):
            shard = parse_shard(entry["name"], root, int(entry.get("size") or 0))
            if shard is None:
                continue
            record = read_back(fs, shard, False, known.get(shard.file))
            records.append(record or {"file": shard.file, "rows": None, "bytes": shard.size, "sha256": None})
    return records
