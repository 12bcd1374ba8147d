"""The manifest files an output was computed from, and what happens to the shards of a file that
left the manifest.

A unit is named by its file's path relative to the manifest root (kandinsky_engine/units.py), so
a file renamed in place (`md/a.parquet` -> `md/b.parquet`) is, by name, a new file with new units,
and its old folder `data/a-<hash>/` holds the same ids: a rerun would compute them again and data/
would hold every row twice. So each run records the manifest's files in PATH/_files.parquet
(folder key, relative path, identity, rows) before it commits anything, and a rerun that finds
shards of a folder whose file is gone (`plan_gone`, read-only):

- **renamed**: the registry names the gone file's identity (the sha256 of its bytes on disk, the
  ETag on object stores) and row count, and exactly one file of the manifest has both. Its shards
  are adopted: copied under the new file's folder and names (the new path's unit digests), then
  removed from the old folder. Nothing is recomputed; the shards' bytes hold nothing of the path.
  A unit the new file has already committed keeps its own shards, and the old unit's are retired.
- **left over** (a file removed from the manifest, or renamed and changed): its data shards' ids
  are compared with the manifest's. None in common: the folder stays and is reported. Some in
  common: those rows would be in data/ twice, so the run is refused before it changes anything,
  naming the folder and the files; with --recompute-changed the folder is retired.

Retired shards go to PATH/_retired/{run}/, which no reader loads (pyarrow and `datasets` skip `_`
entries, and the dataset's files are data/**). `verify` and the run's final check fail on any id
that is in data/ more than once, whatever folder it is in (jobs/verify.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from kandinsky_engine.normalize import text_ids
from kandinsky_engine.storage import copy_file, is_local, move_file, remove_file, url_to_fs
from kandinsky_engine.units import file_key, unit_digest

from .output import FILES, RETIRED, Shard, put_bytes
from .shards import format_of

REGISTRY_SCHEMA = pa.schema([("key", pa.string()), ("relpath", pa.string()), ("identity", pa.string()),
                             ("rows", pa.int64())])


@dataclass
class Gone:
    """What a run does with the shards of files no longer in the manifest (see the module docstring)."""

    adopt: list[tuple[Shard, str]] = field(default_factory=list)  # (shard, its new file) in copy order
    clear: list[Shard] = field(default_factory=list)  # uncommitted shards where adopted units go
    retire: list[Shard] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)  # old relative path -> new one
    conflicts: dict[str, list[str]] = field(default_factory=dict)  # gone folder -> manifest files sharing ids
    leftover: dict[str, list[Shard]] = field(default_factory=dict)  # gone folder -> its shards, kept

    @property
    def changes(self) -> bool:
        return bool(self.adopt or self.retire or self.conflicts)


def read_registry(fs, root: str) -> dict[str, dict]:
    """{folder key: {relpath, identity, rows}} of the files earlier runs recorded ({} if none)."""
    try:
        with fs.open(f"{root}/{FILES}", "rb") as f:
            return {r["key"]: r for r in pq.read_table(f).to_pylist()}
    except Exception:  # none yet, or torn: renamed files are then not recognised, leftovers still checked
        return {}


def write_registry(fs, root: str, files: list, registry: dict[str, dict], keep: set[str], tag: str) -> None:
    """The manifest's files, plus the earlier entries of `keep` (gone folders that still hold shards)."""
    rows = {k: v for k, v in registry.items() if k in keep}
    rows.update({file_key(f.relpath): {"key": file_key(f.relpath), "relpath": f.relpath, "identity": f.identity,
                                       "rows": f.num_rows} for f in files})
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(sorted(rows.values(), key=lambda r: r["key"]), schema=REGISTRY_SCHEMA), sink)
    put_bytes(fs, root, FILES, sink.getvalue().to_pybytes(), tag)


def plan_gone(fs, found, files: list, registry: dict[str, dict], rows_per_block: int,
              storage_options: dict | None) -> Gone:
    """Decide, read-only, what happens to `found.gone` (reconcile.Inspection)."""
    plan = Gone()
    by_content: dict[tuple, list] = defaultdict(list)
    for f in files:
        by_content[(f.identity, f.num_rows)].append(f)
    committed = {unit for unit, shards in found.data.items() if any(s.attempt == 1 for s in shards)}
    for key in sorted(found.gone):
        shards = found.gone[key]
        entry = registry.get(key)
        target = by_content.get((entry["identity"], entry["rows"]), []) if entry else []
        if len(target) != 1 or not _adopt(plan, found, shards, entry, target[0], rows_per_block, committed):
            plan.leftover[key] = shards
    if plan.leftover:
        plan.conflicts = _shared_ids(fs, plan.leftover, files, storage_options)
    return plan


def _adopt(plan: Gone, found, shards: list[Shard], entry: dict, new, rows_per_block: int, committed: set) -> bool:
    """Plan the old folder's shards under `new`'s names; False if they were not computed from the
    file the registry describes (then they are left over)."""
    by_start: dict[int, list[Shard]] = defaultdict(list)
    for shard in shards:
        by_start[shard.start].append(shard)
    for start in by_start:
        stop = min(start + rows_per_block, entry["rows"])
        if start % rows_per_block or start >= entry["rows"] or any(
                s.digest != unit_digest(entry["relpath"], entry["identity"], start, stop) for s in by_start[start]):
            return False
    key = file_key(new.relpath)
    for start, unit_shards in sorted(by_start.items()):
        unit = f"{key}/{start}"
        if unit in committed:  # the new name's own commit wins; the old copies go aside
            plan.retire += unit_shards
            continue
        committed.add(unit)
        plan.clear += found.data.get(unit, []) + found.errors.get(unit, [])
        digest = unit_digest(new.relpath, new.identity, start, min(start + rows_per_block, new.num_rows))
        # The commit mark (attempt 1) last: a copy cut short leaves the unit uncommitted under the new name.
        for shard in sorted(unit_shards, key=lambda s: s.attempt == 1):
            folder, _, name = shard.file.split("/")
            plan.adopt.append((shard, f"{folder}/{key}/{name.replace(f'-{shard.digest}', f'-{digest}', 1)}"))
    plan.renamed[entry["relpath"]] = new.relpath
    return True


def _shared_ids(fs, leftover: dict[str, list[Shard]], files: list, storage_options) -> dict[str, list[str]]:
    """Left-over folders whose data shards hold ids of the manifest: {folder: [manifest files]}.
    Memory grows with the left-over ids only; the manifest's id columns are streamed."""
    owner: dict[bytes, str] = {}
    for key, shards in leftover.items():
        for shard in shards:
            if shard.attempt is None:
                continue
            with fs.open(shard.path, "rb") as f:
                owner.update({_hash(i): key for i in format_of(shard.file).ids(f)})
    shared: dict[str, list[str]] = defaultdict(list)
    if not owner:
        return {}
    for file in files:
        mfs, _ = url_to_fs(file.path, storage_options)
        with mfs.open(file.path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=["id"]):
                for row_id in text_ids(batch.column(0)):
                    key = owner.get(_hash(row_id)) if row_id is not None else None
                    if key is not None and file.relpath not in shared[key]:
                        shared[key].append(file.relpath)
    return dict(shared)


def _hash(row_id: str) -> bytes:
    return hashlib.blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def apply_gone(fs, root: str, plan: Gone, tag: str, known: dict[str, dict]) -> dict[str, dict]:
    """Carry out `plan` (retiring the conflicting folders too: call only when they may go). Returns
    the records of the adopted shards under their new names, where the old ones were known."""
    for shard in plan.clear:
        remove_file(fs, shard.path)
    adopted = {}
    for shard, name in plan.adopt:  # every copy first, then the removals: a crash loses nothing
        copy_file(fs, shard.path, f"{root}/{name}")
        if shard.file in known:
            adopted[name] = {**known[shard.file], "file": name}
    for shard, _ in plan.adopt:
        remove_file(fs, shard.path)
    retired = plan.retire + [s for key in plan.conflicts for s in plan.leftover[key]]
    for shard in retired:
        move_file(fs, shard.path, f"{root}/{RETIRED}/{tag}/{shard.file}")
    if is_local(fs):  # folders exist on disk: the emptied ones go (an object store has none)
        for folder in sorted({s.path.rsplit("/", 1)[0] for s in retired + [s for s, _ in plan.adopt]}):
            with contextlib.suppress(OSError):
                os.rmdir(fs._strip_protocol(folder))
    return adopted
