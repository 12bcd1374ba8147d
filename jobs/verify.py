"""`kandinsky-batch verify OUTPUT`: check the invariants of an output and name what is wrong.

An output is sound when
1. its `_RUN.json` is readable and the fingerprint recomputed from the recorded config (manifest,
   weights, libraries) equals the recorded one;
2. every file in data/ and errors/ is a shard of the layout, of a unit of the manifest, named with
   that unit's digest (so it was computed from the manifest's current rows);
3. every shard has the size and sha256 of its record (`_SUCCESS.json`); the job's own check before
   it writes `_SUCCESS.json` compares sizes, the command reads every shard and compares sha256;
4. every data shard has the job's output schema (one schema for the whole of data/);
5. every manifest id of a committed unit is in data/ or errors/ exactly once, every unit the run
   covered (all, or a --limit's) is committed, and `_SUCCESS.json`'s counts agree.

The job runs the same checks (`check_output`) before it writes `_SUCCESS.json`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from kandinsky_engine.units import Unit
from pipelines.output import DATA, ERRORS, SUMMARY, entries, parse_shard, record_of

MAX_SHOWN = 30  # problems listed; the count of the rest is given

@dataclass
class Check:
    problems: list[str] = field(default_factory=list)
    rows: int = 0  # ids in data/
    failed_rows: int = 0  # ids in errors/
    committed_units: int = 0
    shards: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

def _read(fs, path: str, deep: bool) -> tuple[pa.Schema, list, dict | None]:
    """(schema, ids, record if deep) of a shard."""
    if deep:
        payload = fs.cat_file(path)
        table = pq.read_table(pa.BufferReader(payload))  # every page must decode
        return table.schema, table["id"].to_pylist(), record_of("", payload, table.num_rows)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        return parquet.schema_arrow, parquet.read(columns=["id"])["id"].to_pylist(), None

def check_output(fs, root: str, units: list[Unit], scope: int, schema: pa.Schema, records: dict[str, dict],
                 deep: bool) -> Check:
    """Invariants 2-5 (without `_SUCCESS.json`'s counts) over the output at `root`. `scope`: how many
    leading units the run covered; `records`: file -> {bytes, sha256} as recorded."""
    check = Check()
    by_unit: dict[int, list] = {}
    for folder in (DATA, ERRORS):
        for entry in entries(fs, f"{root}/{folder}"):
            shard = parse_shard(entry["name"], root, int(entry.get("size") or 0))
            name = entry["name"][len(root) + 1:]
            if shard is None:
                check.problems.append(f"{name}: not a file of the output layout")
                continue
            check.shards += 1
            if shard.unit >= len(units):
                check.problems.append(f"{name}: unit {shard.unit} is not in the manifest ({len(units)} units)")
                continue
            if shard.digest != units[shard.unit].digest:
                check.problems.append(f"{name}: computed from other manifest rows than unit {shard.unit}'s "
                                      f"(digest {shard.digest}, manifest {units[shard.unit].digest})")
                continue
            record = records.get(shard.file)
            if record is None:
                check.problems.append(f"{name}: no record of this shard (written by a run that did not finish?)")
            elif record["bytes"] != shard.size:
                check.problems.append(f"{name}: {shard.size} bytes, recorded {record['bytes']}")
            try:
                found_schema, ids, read = _read(fs, shard.path, deep)
            except Exception as exc:
                check.problems.append(f"{name}: unreadable ({type(exc).__name__}: {exc})")
                continue
            if deep and record is not None and read["sha256"] != record["sha256"]:
                check.problems.append(f"{name}: sha256 {read['sha256'][:16]}..., recorded {record['sha256'][:16]}...")
            if shard.attempt is not None and not found_schema.equals(schema, check_metadata=False):
                check.problems.append(f"{name}: schema differs from the job's output schema: {_schema_diff(found_schema, schema)}")
            by_unit.setdefault(shard.unit, []).append((shard, ids))
    for unit in units:
        shards = by_unit.get(unit.index, [])
        committed = any(s.attempt == 1 for s, _ in shards)
        if not committed:
            if unit.index < scope:
                check.problems.append(f"unit {unit.index} (ids {unit.ids[0]!r}..{unit.ids[-1]!r}) is not committed")
            elif shards:
                check.problems.append(f"unit {unit.index}: shards without its commit mark (attempt 1): "
                                      + ", ".join(s.file for s, _ in shards))
            continue
        check.committed_units += 1
        counts = Counter(i for _, ids in shards for i in ids)
        data_ids = sum(len(ids) for s, ids in shards if s.attempt is not None)
        check.rows += data_ids
        check.failed_rows += sum(len(ids) for s, ids in shards if s.attempt is None)
        twice = sorted(i for i, c in counts.items() if c > 1)
        missing = [i for i in unit.ids if i not in counts]
        extra = sorted(set(counts) - set(unit.ids))
        for what, ids in (("more than once", twice), ("missing", missing), ("not in the unit", extra)):
            if ids:
                check.problems.append(f"unit {unit.index}: {len(ids)} id(s) {what} across data/ and errors/: "
                                      f"{', '.join(repr(i) for i in ids[:5])}")
    return check

def _schema_diff(found: pa.Schema, want: pa.Schema) -> str:
    got = {f.name: str(f.type) for f in found}
    expected = {f.name: str(f.type) for f in want}
    diff = [f"{n}: {got.get(n, 'absent')} (expected {expected.get(n, 'absent')})"
            for n in dict.fromkeys([*expected, *got]) if got.get(n) != expected.get(n)]
    return "; ".join(diff[:5]) or "column order"

def verify(path: str, *, config=None, deep: bool = True) -> Check:
    """Every invariant of the output at `path`. The job config comes from its `_RUN.json`, or from
    `config` (whose storage options then reach the manifest, output and models)."""
    from kandinsky_engine.columns import output_schema
    from kandinsky_engine.config import JobConfig
    from kandinsky_engine.identity import weights_digests
    from kandinsky_engine.manifest import validate_manifest
    from kandinsky_engine.storage import url_to_fs
    from kandinsky_engine.units import cut_units, in_scope

    from .resume import differences, fingerprint, fingerprint_inputs, read_run

    options = config.storage_options if config is not None else {}
    fs, root = url_to_fs(path.rstrip("/"), options)
    run = read_run(fs, root)
    if run is None:
        return Check(problems=[f"{path}: no _RUN.json: not the output of a job run by this tool (or not started)"])
    if config is None:
        if "config" not in run:
            return Check(problems=[f"{path}/_RUN.json records no config (older version): pass --config JOB.yaml"])
        config = JobConfig.model_validate({**run["config"], "storage_options": {}})
    config = config.model_copy(update={"output": config.output.model_copy(update={"path": path})})
    manifest = validate_manifest(config)
    inputs = fingerprint_inputs(config, manifest, weights_digests(config.model, config.storage_options))
    problems = []
    if fingerprint(inputs) != run["fingerprint"]:
        changed = "; ".join(differences(run["inputs"], inputs)[:10])
        problems.append(f"_RUN.json: fingerprint {run['fingerprint']}, recomputed {fingerprint(inputs)} ({changed})")
    summary = _read_summary(fs, root, problems)
    records = {r["file"]: r for r in summary.get("shards", []) + summary.get("error_shards", [])}
    units = cut_units(manifest.ids, manifest.unit_digests, config.rows_per_block())
    scope = len(in_scope(units, summary.get("limit")))
    check = check_output(fs, root, units, scope, output_schema(manifest.schema), records, deep)
    check.problems = problems + check.problems
    if summary:
        if (summary.get("rows"), summary.get("failed_rows")) != (check.rows, check.failed_rows):
            check.problems.append(f"{SUMMARY}: says {summary.get('rows')} rows and {summary.get('failed_rows')} failed; "
                                  f"found {check.rows} and {check.failed_rows}")
        if summary.get("complete") and check.committed_units != len(units):
            check.problems.append(f"{SUMMARY}: says complete, but {len(units) - check.committed_units} unit(s) "
                                  "are not committed")
    return check

def _read_summary(fs, root: str, problems: list[str]) -> dict:
    try:
        with fs.open(f"{root}/{SUMMARY}", "r") as f:
            return json.load(f)
    except FileNotFoundError:
        problems.append(f"no {SUMMARY}: the job has not finished (run it again to complete it)")
    except ValueError as exc:
        problems.append(f"{SUMMARY} is damaged ({exc}); rerun the job to rewrite it")
    return {}

def report(check: Check, path: str) -> str:
    if check.ok:
        return (f"ok: {path}: {check.rows} rows in data/, {check.failed_rows} in errors/, {check.shards} shards, "
                f"{check.committed_units} units committed")
    shown = check.problems[:MAX_SHOWN]
    more = f"\n  ... and {len(check.problems) - MAX_SHOWN} more" if len(check.problems) > MAX_SHOWN else ""
    return f"{path}: {len(check.problems)} problem(s):\n  " + "\n  ".join(shown) + more
