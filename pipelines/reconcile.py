"""Resuming: what a run finds in its output, and how it makes the output consistent with its scope.

Before a run, `inspect` compares the output with the manifest, read-only:
- a shard whose digest is not its unit's was computed from other rows (the file was rewritten):
  the run is refused, or with --recompute-changed the file's units are run again;
- a data shard whose size differs from its record (or with --check-shards, whose sha256 does), or
  that its format cannot decode, is damaged: it is moved to _damaged/ and its whole unit is run
  again (whole, so that its rows batch as before and no row of another attempt is duplicated). Its
  record is never replaced by what is on disk: a shard's bytes are fixed by its name (unit, digest,
  attempt), so other bytes under that name were not written by a run. An errors shard is rewritten
  in place by each retry, so one that differs from its record (written by a run killed before its
  report) is read back instead;
- a shard without a record (committed by a run killed before its report) is read back once;
- a hidden file in data/ or errors/ (`.DS_Store`) is ignored; any other file that is not a shard of
  the layout is `foreign`, and the run refuses to start, naming it, before it changes anything;
- shards of a file no longer in the manifest (`gone`) are handled by pipelines/sources.py.

`reconcile` then removes what cannot be trusted and lists the work left.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from kandinsky_engine.storage import move_file, remove_file, remove_tree
from kandinsky_engine.units import file_key

from .output import DAMAGED, DATA, ERRORS, TMP, Shard, entries, expected_digest, parse_shard, record_of
from .shards import format_of


@dataclass
class Inspection:
    """What a previous run left, read-only: shards by unit name, and what cannot be trusted."""

    data: dict[str, list[Shard]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, list[Shard]] = field(default_factory=lambda: defaultdict(list))
    foreign: list[str] = field(default_factory=list)  # files in data/ or errors/ not in the layout
    changed: dict[str, list[str]] = field(default_factory=dict)  # manifest file -> its units whose shards name other rows
    gone: dict[str, list[Shard]] = field(default_factory=dict)  # folder key of a file no longer in the manifest -> shards
    damaged: list[Shard] = field(default_factory=list)
    records: dict[str, dict] = field(default_factory=dict)  # file -> record, for every healthy shard
    read: set[str] = field(default_factory=set)  # files among `records` that had no record and were read back
    has_tmp: bool = False


def read_back(fs, shard: Shard, deep: bool, known: dict | None) -> dict | None:
    """The shard's record if it is healthy, else None (damaged). A known record is trusted when
    the size matches (unless `deep`); a data shard that differs from its record is damaged (see
    the module docstring); anything else is read whole, decoded and hashed."""
    if known is not None and known["bytes"] == shard.size and not deep:
        return known
    if known is not None and shard.attempt is not None and known["bytes"] != shard.size:
        return None  # other bytes under a data shard's name: never re-recorded from disk
    try:
        payload = fs.cat_file(shard.path)
        rows = format_of(shard.file).decode(payload)[0]  # every page (member) decodes, not just the footer
    except Exception:  # truncated, garbage, vanished: not a shard any reader can use
        return None
    record = record_of(shard.file, payload, rows)
    if known is not None and shard.attempt is not None and known["sha256"] != record["sha256"]:
        return None  # same size, other bytes: bit rot, or a shard edited in place
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
                found.gone.setdefault(shard.key, []).append(shard)
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
                if record is not known.get(shard.file):
                    found.read.add(shard.file)
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
            move_file(fs, shard.path, f"{root}/{DAMAGED}/{tag}/{shard.file}")
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
