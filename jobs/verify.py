"""`kandinsky-batch verify OUTPUT`: check the invariants of an output and name what is wrong.

An output is sound when
1. its `_RUN.json` is readable and the fingerprint recomputed from the recorded config (manifest
   schema, weights, libraries) equals the recorded one;
2. every file in data/ and errors/ is a shard of the layout, of a unit of a manifest file, named
   with that unit's digest (so it was computed from the file as it is now);
3. every shard has the size and sha256 of its record (`_index.parquet`); the job's own check
   before it writes `_SUCCESS.json` compares sizes, the command reads every shard and compares
   sha256;
4. every data shard has the job's output schema (one schema for the whole of data/; a webdataset
   shard's json members hold its columns but the image, and every sample has its image);
5. every id of a committed unit is in data/ or errors/ exactly once, every unit the run covered
   (all, or a --limit's) is committed, and `_SUCCESS.json`'s counts agree.
Shards of manifest files that are gone from the manifest are reported; an id that is in data/ in
two places (such a folder and the manifest's own shards, or two such folders) is a problem that
names both.

The job runs the same checks (`check_output`) before it writes `_SUCCESS.json`. Both read the
id column of every manifest file and every shard, one file at a time.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from kandinsky_engine.normalize import text_ids
from kandinsky_engine.storage import refuse_glob, url_to_fs
from kandinsky_engine.units import file_key, limit_stops
from kandinsky_engine.pipelines.output import DATA, ERRORS, INDEX, SUMMARY, entries, expected_digest, parse_shard, read_records, record_of
from kandinsky_engine.pipelines.shards import format_of

MAX_SHOWN = 30  # problems listed; the count of the rest is given


@dataclass
class Check:
    problems: list[str] = field(default_factory=list)
    rows: int = 0  # ids in data/
    failed_rows: int = 0  # ids in errors/
    committed_units: int = 0
    shards: int = 0
    files: list[dict] = field(default_factory=list)  # per manifest file: rows, units, committed, complete
    gone: dict[str, int] = field(default_factory=dict)  # folder of a file no longer in the manifest -> shards

    @property
    def ok(self) -> bool:
        return not self.problems


def _read(fs, path: str, deep: bool) -> tuple[object, list, dict | None]:
    """(layout, ids, record if deep) of a shard; the layout is what its format's schema_problem judges."""
    shards = format_of(path)
    if deep:
        payload = fs.cat_file(path)
        rows, ids, layout = shards.decode(payload)  # every page (member) must decode
        return layout, ids, record_of("", payload, rows)
    if shards.ext == "tar":
        with fs.open(path, "rb") as f:
            ids, layout = shards.scan(f)
            return layout, ids, None
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        return parquet.schema_arrow, parquet.read(columns=["id"])["id"].to_pylist(), None


def _manifest_ids(file, storage_options) -> list:
    fs, _ = url_to_fs(file.path, storage_options)
    with fs.open(file.path, "rb") as f:
        return text_ids(pq.ParquetFile(f).read(columns=["id"])["id"].combine_chunks())


def check_output(fs, root: str, config, files: list, stops: list[int], schema: pa.Schema, records: dict[str, dict],
                 deep: bool) -> Check:
    """Invariants 2-5 (without `_SUCCESS.json`'s counts) over the output at `root`. `files`: the
    manifest's (ManifestFile); `stops[i]`: the rows of files[i] the run covered; `records`: file ->
    {bytes, sha256} as recorded."""
    rows_per_block = config.rows_per_block()
    check = Check()
    by_key = {file_key(f.relpath): f for f in files}
    shards_by_key: dict[str, list] = defaultdict(list)
    gone: list = []
    for folder in (DATA, ERRORS):
        for entry in entries(fs, f"{root}/{folder}"):
            shard = parse_shard(entry["name"], root, int(entry.get("size") or 0))
            name = entry["name"][len(root) + 1:]
            if shard is None:
                check.problems.append(f"{name}: not a file of the output layout")
            elif shard.key not in by_key:
                check.gone[shard.key] = check.gone.get(shard.key, 0) + 1
                gone.append(shard)
            else:
                shards_by_key[shard.key].append(shard)
    elsewhere = _gone_ids(fs, gone, check)
    twice: dict[tuple[str, str], list] = defaultdict(list)  # (shard, gone shard) -> ids in both
    for file, stop in zip(files, stops):
        key = file_key(file.relpath)
        by_unit: dict[int, list] = defaultdict(list)
        for shard in shards_by_key.get(key, []):
            check.shards += 1
            problem = _check_shard(fs, shard, by_key, rows_per_block, records.get(shard.file), schema, deep, by_unit)
            if problem:
                check.problems.append(problem)
        for shard, ids in (pair for pairs in by_unit.values() for pair in pairs if pair[0].attempt is not None):
            for i in ids:
                if i in elsewhere:
                    twice[(shard.file, elsewhere[i])].append(i)
        ids = _manifest_ids(file, config.storage_options) if by_unit else []
        committed = 0
        for start in range(0, file.num_rows, rows_per_block):
            shards = by_unit.get(start, [])
            unit = f"{file.relpath} rows {start}..{min(start + rows_per_block, file.num_rows) - 1}"
            if not any(s.attempt == 1 for s, _ in shards):
                if start < stop:
                    check.problems.append(f"{unit}: not committed")
                elif shards:
                    check.problems.append(f"{unit}: shards without its commit mark (attempt 1): "
                                          + ", ".join(s.file for s, _ in shards))
                continue
            committed += 1
            check.rows += sum(len(i) for s, i in shards if s.attempt is not None)
            check.failed_rows += sum(len(i) for s, i in shards if s.attempt is None)
            _check_ids(check, unit, ids[start:start + rows_per_block], shards)
        check.committed_units += committed
        units = -(-file.num_rows // rows_per_block)
        check.files.append({"file": file.relpath, "rows": file.num_rows, "units": units, "committed_units": committed,
                            "complete": committed == units})
    check.problems += [_twice(ids, a, b) for (a, b), ids in twice.items()]
    return check


def _gone_ids(fs, gone: list, check: Check) -> dict:
    """{id: data shard} of the data shards of folders whose file left the manifest; an id in two of
    them is a problem. Memory grows with those folders' rows only."""
    place: dict = {}
    twice: dict[tuple[str, str], list] = defaultdict(list)
    for shard in gone:
        if shard.attempt is None:
            continue
        try:
            with fs.open(shard.path, "rb") as f:
                ids = format_of(shard.file).ids(f)
        except Exception as exc:
            check.problems.append(f"{shard.file}: unreadable ({type(exc).__name__}: {exc})")
            continue
        for i in ids:
            if i in place:
                twice[(shard.file, place[i])].append(i)
            else:
                place[i] = shard.file
    check.problems += [_twice(ids, a, b) for (a, b), ids in twice.items()]
    return place


def _twice(ids: list, a: str, b: str) -> str:
    return (f"{len(ids)} id(s) in data/ twice, in {a} and in {b} (a folder of a file no longer in the manifest): "
            f"{', '.join(repr(i) for i in ids[:5])}")


def _check_shard(fs, shard, by_key, rows_per_block, record, schema, deep, by_unit) -> str | None:
    """A problem with one shard, or None (its ids then go to `by_unit`)."""
    name = shard.file
    want = expected_digest(by_key, shard.key, shard.start, rows_per_block)
    if want != shard.digest:
        return (f"{name}: computed from other manifest rows than {by_key[shard.key].relpath} holds now "
                f"(digest {shard.digest}, expected {want})")
    if record is None:
        return f"{name}: no record of this shard (written by a run that did not finish?)"
    if record["bytes"] != shard.size:
        return f"{name}: {shard.size} bytes, recorded {record['bytes']}"
    try:
        found_schema, ids, read = _read(fs, shard.path, deep)
    except Exception as exc:
        return f"{name}: unreadable ({type(exc).__name__}: {exc})"
    if deep and read["sha256"] != record["sha256"]:
        return f"{name}: sha256 {read['sha256'][:16]}..., recorded {record['sha256'][:16]}..."
    if shard.attempt is not None and (diff := format_of(shard.file).schema_problem(found_schema, schema)):
        return f"{name}: schema differs from the job's output schema: {diff}"
    by_unit[shard.start].append((shard, ids))
    return None


def _check_ids(check: Check, unit: str, unit_ids: list, shards: list) -> None:
    counts = Counter(i for _, ids in shards for i in ids)
    twice = sorted(i for i, c in counts.items() if c > 1)
    missing = [i for i in unit_ids if i not in counts]
    extra = sorted(set(counts) - set(unit_ids))
    for what, ids in (("more than once", twice), ("missing", missing), ("not in the unit", extra)):
        if ids:
            check.problems.append(f"{unit}: {len(ids)} id(s) {what} across data/ and errors/: "
                                  f"{', '.join(repr(i) for i in ids[:5])}")


def verify(path: str, *, config=None, deep: bool = True) -> Check:
    """Every invariant of the output at `path`. The job config comes from its `_RUN.json`, or from
    `config` (whose storage options then reach the manifest, output and models)."""
    from kandinsky_engine.columns import output_schema
    from kandinsky_engine.identity import weights_digests
    from kandinsky_engine.manifest import validate_manifest
    from kandinsky_engine.models import resolve_sources

    from .resume import differences, fingerprint, fingerprint_inputs, read_run

    options = config.storage_options if config is not None else {}
    refuse_glob(path.rstrip("/"), "output")
    fs, root = url_to_fs(path.rstrip("/"), options)
    run = read_run(fs, root)
    if run is None:
        return Check(problems=[f"{path}: no _RUN.json: not the output of a job run by this tool (or not started)"])
    if config is None and "config" not in run:
        return Check(problems=[f"{path}/_RUN.json records no config (older version): pass --config JOB.yaml"])
    config, family = job_config(path, run, config)
    manifest = validate_manifest(config, rehash=True)  # the bytes, never the digest cache
    parts = family.used_parts(config.model, config.storage_options)
    sources = resolve_sources(config.model, parts, config.storage_options, rehash=True, hub_configs=False)
    weights = weights_digests(sources)
    inputs = fingerprint_inputs(config, manifest.schema, weights)
    problems = []
    if fingerprint(inputs) != run["fingerprint"]:
        changed = "; ".join(differences(run["inputs"], inputs)[:10])
        problems.append(f"_RUN.json: fingerprint {run['fingerprint']}, recomputed {fingerprint(inputs)} ({changed})")
    summary = _read_summary(fs, root, problems)
    try:
        records = {r["file"]: r for r in read_records(fs, f"{root}/{INDEX}")} if summary else {}
    except Exception as exc:
        problems.append(f"{INDEX} is unreadable ({type(exc).__name__}: {exc}); rerun the job to rewrite it")
        records = {}
    stops = limit_stops(manifest.files, summary.get("limit"), config.rows_per_block())
    check = check_output(fs, root, config, manifest.files, stops, output_schema(manifest.schema, config.output.columns), records,
                         deep)
    check.problems = problems + check.problems
    if summary:
        if (summary.get("rows"), summary.get("failed_rows")) != (check.rows, check.failed_rows):
            check.problems.append(f"{SUMMARY}: says {summary.get('rows')} rows and {summary.get('failed_rows')} failed; "
                                  f"found {check.rows} and {check.failed_rows}")
        if summary.get("complete") and not all(f["complete"] for f in check.files):
            check.problems.append(f"{SUMMARY}: says complete, but not every unit is committed")
    return check


def job_config(path: str, run: dict, config=None):
    """(config, family) of the output at `path`: `config` if given, else the one its _RUN.json
    records, with output.path set to `path` (the output may have moved)."""
    from kandinsky_engine.config import JobConfig
    from kandinsky_engine.families import resolve_family

    if config is None:
        config = JobConfig.model_validate({**run["config"], "storage_options": {}})
    config = config.model_copy(update={"output": config.output.model_copy(update={"path": path})})
    return resolve_family(config)


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
    gone = (f"; shards of {len(check.gone)} file(s) no longer in the manifest left as they are"
            if check.gone else "")
    if check.ok:
        return (f"ok: {path}: {check.rows} rows in data/, {check.failed_rows} in errors/, {check.shards} shards, "
                f"{check.committed_units} units committed{gone}")
    shown = check.problems[:MAX_SHOWN]
    more = f"\n  ... and {len(check.problems) - MAX_SHOWN} more" if len(check.problems) > MAX_SHOWN else ""
    return f"{path}: {len(check.problems)} problem(s):\n  " + "\n  ".join(shown) + more + gone
