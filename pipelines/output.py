"""The output layout and its commit protocol: what makes a rerun resume exactly once.

    PATH/_RUN.json                         run fingerprint (written before the first shard)
    PATH/data/part-{unit:08d}-a{K}.parquet    rows of unit `unit` that succeeded at attempt K
    PATH/errors/part-{unit:08d}.parquet       rows of that unit still failing (latest attempt)
    PATH/_SUCCESS.json                     written last, when every row is in data/ or errors/

A unit is `rows_per_block` consecutive manifest rows (unit = row position // rows_per_block), the
same in every run. Attempt 1 runs all its rows and always writes its data shard, even an empty
one: that shard is the unit's commit mark. It writes errors first, then data, so a unit with a
data shard has its failures recorded. A later run retries only the rows of committed units that
are in no data shard (attempt K >= 2, one more than the latest attempt in the unit's data or
errors shards, writes the rows that now succeed, then replaces or removes the errors shard).
Every file is written under _tmp/ and moved into place, so readers never see a torn file, and
names depend on the unit and attempt only, so a retried write task rewrites the same file with
the same bytes instead of adding a duplicate.

Why not Ray Data's checkpointing (`DataContext.checkpoint_config`, Ray 2.60): it filters done
rows right after the read, by id, before our units are formed, so a resumed run would batch the
remaining rows differently (on CPU that changes pixels); it checkpoints every row the sink sees,
failed ones included, so failed rows would never be retried; and its two-phase commit only covers
`_FileDatasink`s, while this sink writes two datasets (data/ and errors/).
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from kandinsky_engine.storage import ensure_dir

DATA, ERRORS, TMP = "data", "errors", "_tmp"
DAMAGED = "_damaged"  # shards set aside as unreadable
RUN_FILE, SUMMARY = "_RUN.json", "_SUCCESS.json"  # the fingerprint (jobs/resume.py), the summary (jobs/run.py)
RUNS = "_runs"  # one report per run (also those that ended with failed rows)
# Every entry a job writes under its output root, and so all that --overwrite may remove: the
# root itself may hold other files (a README, the manifest, a bucket's other keys). In removal
# order: the summary first (the output stops claiming to be complete), the run file last (a
# removal cut short still holds _RUN.json, so --overwrite can take it up again).
OWNED_ENTRIES = (SUMMARY, DATA, ERRORS, TMP, DAMAGED, RUNS, RUN_FILE)
SHARD = re.compile(r"part-(\d{8})-a(\d+)\.parquet$")
ERRORS_SHARD = re.compile(r"part-(\d{8})\.parquet$")


def data_name(unit: int, attempt: int) -> str:
    return f"part-{unit:08d}-a{attempt}.parquet"


def errors_name(unit: int) -> str:
    return f"part-{unit:08d}.parquet"


def put(fs, root: str, folder: str, name: str, table: pa.Table, tmp_tag: str) -> dict:
    """Write `table` to root/folder/name through a temporary file; returns its record.

    On local disk the move is a rename; on S3 a server-side copy, whose new object appears whole.
    """
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    payload = sink.getvalue().to_pybytes()
    tmp = f"{root}/{TMP}/{tmp_tag}-{folder}-{name}"
    ensure_dir(fs, f"{root}/{TMP}")  # never s3fs's makedirs: it creates a missing bucket
    ensure_dir(fs, f"{root}/{folder}")
    with fs.open(tmp, "wb") as f:
        f.write(payload)
    fs.mv(tmp, f"{root}/{folder}/{name}")
    return {"file": f"{folder}/{name}", "rows": table.num_rows, "bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest()}


@dataclass
class Unit:
    index: int
    ids: list[str]


def cut_units(ids: list[str], rows_per_block: int, limit: int | None = None) -> list[Unit]:
    """Units in manifest order. A limit is rounded up to whole units, so that a smoke run's units
    are the full run's units and the full run can resume it."""
    if limit:
        ids = ids[: -(-limit // rows_per_block) * rows_per_block]
    return [Unit(n, ids[start:start + rows_per_block]) for n, start in enumerate(range(0, len(ids), rows_per_block))]


@dataclass
class State:
    """What a previous run left: the work still to do, and what the report needs to know."""

    todo: dict[int, tuple[int, list[str] | None]] = field(default_factory=dict)  # unit -> (attempt, rows or None=all)
    rows_done: int = 0  # rows already committed in data/ (skipped)
    rows_retried: int = 0  # rows committed as failed, run again
    cleaned: list[str] = field(default_factory=list)  # stale files removed


def scan(fs, root: str, units: list[Unit]) -> State:
    """Compare the output with the job's units; remove files no reader should trust."""
    data: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for path in _ls(fs, f"{root}/{DATA}"):
        if m := SHARD.search(path):
            data[int(m[1])].append((int(m[2]), path))
    errors = {int(m[1]): path for path in _ls(fs, f"{root}/{ERRORS}") if (m := ERRORS_SHARD.search(path))}
    state = State()
    if fs.exists(f"{root}/{TMP}"):  # pieces of writes that never finished
        state.cleaned.append(f"{TMP}/")
        fs.rm(f"{root}/{TMP}", recursive=True)
    for unit in units:
        shards = data.get(unit.index, [])
        if not any(attempt == 1 for attempt, _ in shards):
            if unit.index in errors:  # written before a crash stopped the commit
                fs.rm(errors[unit.index])
                state.cleaned.append(f"{ERRORS}/{errors_name(unit.index)}")
            state.todo[unit.index] = (1, None)
            continue
        if unit.index not in errors:
            state.rows_done += len(unit.ids)
            continue
        done = set()
        for _, path in shards:
            with fs.open(path, "rb") as f:
                done.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
        pending = [i for i in unit.ids if i not in done]
        state.rows_done += len(unit.ids) - len(pending)
        if not pending:  # the last attempt committed its rows but stopped before removing the errors
            fs.rm(errors[unit.index])
            continue
        state.rows_retried += len(pending)
        # A retry in which every row failed again writes no data shard, only the errors shard (with
        # its attempt): without it the next run would number its attempt as that one's again.
        with fs.open(errors[unit.index], "rb") as f:
            failed_at = pq.read_table(f, columns=["attempt"]).column("attempt").to_pylist()
        state.todo[unit.index] = (max([a for a, _ in shards] + failed_at) + 1, pending)
    return state


def _ls(fs, folder: str) -> list[str]:
    try:
        return fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []


def shard_records(fs, root: str, known: dict[str, dict]) -> list[dict]:
    """Every data and errors shard with rows, bytes and sha256. Records written by this or an
    earlier run (`known`, by file) are trusted when the size still matches; the rest (shards of a
    run that was killed before it could report) are read back once."""
    records = []
    for folder in (DATA, ERRORS):
        try:
            listing = fs.ls(f"{root}/{folder}", detail=True)
        except FileNotFoundError:
            continue
        for entry in sorted(listing, key=lambda e: e["name"]):
            name = entry["name"].rsplit("/", 1)[-1]
            if not name.endswith(".parquet"):
                continue
            record = known.get(f"{folder}/{name}")
            if record is None or record["bytes"] != entry["size"]:
                payload = fs.cat_file(entry["name"])
                rows = pq.ParquetFile(pa.BufferReader(payload)).metadata.num_rows
                record = {"file": f"{folder}/{name}", "rows": rows, "bytes": len(payload),
                          "sha256": hashlib.sha256(payload).hexdigest()}
            records.append(record)
    return records
