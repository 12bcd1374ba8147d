"""Run a job: validate, connect to Ray, build, write, summarise."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from datetime import datetime, timezone

from kandinsky_engine.columns import output_schema
from kandinsky_engine.config import JobConfig
from kandinsky_engine.identity import model_identity, weights_digests
from kandinsky_engine.manifest import validate_manifest
from kandinsky_engine.model_cache import check_cache_dir
from kandinsky_engine.models import check_source
from kandinsky_engine.storage import access_checked, ensure_dir, redact, url_to_fs
from kandinsky_engine.units import Unit, cut_units, in_scope
from pipelines.output import RUNS, SUMMARY, TMP

from .output_guard import check_output as check_target
from .output_guard import remove_owned
from .resume import choose_output, fingerprint_inputs, write_run
from .verify import check_output
from .verify import report as verify_report

log = logging.getLogger("kandinsky_engine")


def connect(address: str | None) -> float:
    """Attach to `address` (or RAY_ADDRESS); otherwise start a local cluster. Returns seconds taken."""
    import ray

    start = time.perf_counter()
    if not ray.is_initialized():
        # "local" starts a fresh cluster: with no address, ray.init would attach to whatever cluster
        # was started last on this machine (`ray start`, another test), which is not what was asked.
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)
    return time.perf_counter() - start


class ManifestChanged(RuntimeError):
    """Committed units were computed from other manifest rows than the manifest now has."""


def run_job(config: JobConfig, *, address: str | None = None, overwrite: bool = False, limit: int | None = None,
            new_run: bool = False, recompute_changed: bool = False, check_shards: bool = False,
            overwrite_unowned: bool = False, config_file: str | None = None) -> dict:
    """Run (or resume) a job. Returns the summary that is also written to PATH/_SUCCESS.json.

    `limit`: only the first N rows (whole units); `recompute_changed`: rerun the committed units
    whose manifest rows changed instead of refusing; `check_shards`: compare every committed shard's
    sha256 with its record before resuming (reads the whole output), not only its size;
    `overwrite_unowned` also overwrites a folder this tool did not write or that holds the
    manifest or `config_file` (see jobs/output_guard.py).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    # Everything that can fail fast does so before Ray starts or a model loads, and before an
    # existing output is touched (--overwrite deletes it only once the job can run).
    check_cache_dir(config.model.cache_dir)
    manifest = validate_manifest(config)
    config = config.model_copy(update={"tasks": sorted(manifest.tasks)})  # stages keep only the models these need
    from pipelines.output import Inspection, inspect, put_json, reconcile, shard_records

    units = cut_units(manifest.ids, manifest.unit_digests, config.rows_per_block())
    scope = in_scope(units, limit)
    overwrite = overwrite or overwrite_unowned
    with access_checked(config.output.path, config.storage_options, "checking output"):
        check_target(config, overwrite=overwrite, unowned=overwrite_unowned, config_file=config_file)
    for part in ("prior", "decoder"):
        # Builds 'tiny' once, checks local dirs; a remote dir is listed, not downloaded (actors do that).
        check_source(getattr(config.model, part), part, config.model.cache_dir, config.storage_options)
    weights = weights_digests(config.model, config.storage_options)
    inputs = fingerprint_inputs(config, manifest, weights)
    with access_checked(config.output.path, config.storage_options, "checking output"):
        path, mode = choose_output(config, inputs, overwrite=overwrite, new_run=new_run)
    if path != config.output.path.rstrip("/"):
        log.info("this job differs from the run in %s: writing it beside, to %s", config.output.path, path)
    fs, root = url_to_fs(path, config.storage_options)
    tag = uuid.uuid4().hex[:12]  # this run: its report, temporary files, quarantine folder
    earlier, damaged_reports = read_reports(fs, root) if mode == "resume" else ([], [])
    known = {r["file"]: r for rep in earlier for r in rep.get("records", []) if r.get("sha256")}
    found = inspect(fs, root, units, known, deep=check_shards) if mode == "resume" else Inspection()
    if found.changed and not recompute_changed:
        raise ManifestChanged(_changed_message(path, found.changed, units))
    ray_startup_s = connect(address or config.ray_address)

    import ray

    from pipelines.generate import IO_CPUS, build_generation, check_resources
    from pipelines.sink import ShardSink

    check_resources(config, manifest, ray.cluster_resources())
    if mode == "overwrite":
        remove_owned(fs, root)
    if mode != "resume":
        ensure_dir(fs, root)
        write_run(fs, root, inputs, config, tag)
    if fs.exists(f"{root}/{SUMMARY}"):
        fs.rm(f"{root}/{SUMMARY}")  # the output is incomplete again until this run ends

    state = reconcile(fs, root, scope, found, tag)
    todo_rows = sum(len(u.ids) if state.todo[u.index][1] is None else len(state.todo[u.index][1])
                    for u in scope if u.index in state.todo)
    log.info("manifest: %d rows in %d file(s); %d units of %d rows%s; already committed: %d rows; to run: %d rows "
             "(%d retried)%s", manifest.num_rows, len(manifest.files), len(units), config.rows_per_block(),
             f" ({len(scope)} in --limit {limit})" if limit else "", state.rows_done, todo_rows, state.rows_retried,
             f"; removed stale {', '.join(state.cleaned)}" if state.cleaned else "")
    if state.recomputed:
        log.warning("manifest rows changed in %d committed unit(s) (%s): their shards were removed and they run "
                    "again", len(state.recomputed), ", ".join(map(str, state.recomputed[:10])))
    if state.damaged or damaged_reports:
        log.warning("damaged and set aside in %s/_damaged/%s: %s; their units run again", path, tag,
                    ", ".join(state.damaged + damaged_reports))
    if manifest.row_errors:
        log.warning("%d row(s) failed validation and go to errors/, e.g. %s", len(manifest.row_errors),
                    next(iter(manifest.row_errors.values())))
    started = time.perf_counter()
    schema = output_schema(manifest.schema)
    sink = ShardSink(path, config.storage_options, schema, model_identity(config.model, weights), tag)
    if state.todo:
        ds = build_generation(config, manifest, scope, state.todo)
        ds.write_datasink(sink, ray_remote_args={"num_cpus": IO_CPUS})
    wall = time.perf_counter() - started
    this_run = {**found.records, **{r["file"]: r for r in sink.records}}
    records = shard_records(fs, root, {**known, **this_run})
    report = {
        "run": tag,
        "limit": limit,
        "rows_skipped": state.rows_done,
        "rows_computed": todo_rows,
        "rows_retried": state.rows_retried,
        "oom_splits": sink.oom_splits,
        "cleaned": state.cleaned,
        "recomputed_units": state.recomputed,
        "damaged": state.damaged + damaged_reports,
        "wall_time_s": round(wall, 3),
        "images_per_s": round(todo_rows / wall, 4) if wall and todo_rows else None,
        "ray_startup_s": round(ray_startup_s, 3),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "records": records,
    }
    put_json(fs, root, f"{RUNS}/{tag}.json", report, tag)
    # The invariants hold before _SUCCESS.json says so (sizes here; `verify` also checks sha256).
    check = check_output(fs, root, units, len(scope), schema, {r["file"]: r for r in records}, deep=False)
    if not check.ok:
        raise RuntimeError(f"the output failed its check, so no {SUMMARY} was written: {verify_report(check, path)}")
    summary = write_summary(config, fs, root, path, [*earlier, report], records,
                            complete=check.committed_units == len(units), manifest_rows=manifest.num_rows, tag=tag)
    if fs.exists(f"{root}/{TMP}"):  # written through by the shards and the metadata files; empty by now
        fs.rm(f"{root}/{TMP}", recursive=True)
    return summary


def _changed_message(path: str, changed: list[int], units: list[Unit]) -> str:
    shown = "; ".join(f"unit {n} (ids {units[n].ids[0]!r}..{units[n].ids[-1]!r})" if n < len(units) else f"unit {n}"
                      for n in changed[:5])
    more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
    return (f"output {path}: the manifest changed since {len(changed)} committed unit(s) were computed "
            f"(other rows, another order or other values under the same ids): {shown}{more}. Nothing was changed. "
            "Restore the manifest to resume, rerun with --recompute-changed to recompute just those units, "
            "--new-run to write this manifest beside it, or --overwrite to start over")


def read_reports(fs, root: str) -> tuple[list[dict], list[str]]:
    """Reports of earlier runs that reached their end, oldest first (a killed run wrote none), and
    the names of damaged reports, which are skipped: their shards are read back instead."""
    reports, damaged = [], []
    fs.invalidate_cache(f"{root}/{RUNS}")
    for name in sorted(fs.glob(f"{root}/{RUNS}/*.json")):
        try:
            with fs.open(name, "r") as f:
                report = json.load(f)
            report["finished_at"]  # noqa: B018 (a report without it is not one of ours)
        except (ValueError, KeyError, TypeError):
            damaged.append(f"{RUNS}/{name.rsplit('/', 1)[-1]}")
            continue
        reports.append(report)
    return sorted(reports, key=lambda r: r["finished_at"]), damaged


def write_summary(config: JobConfig, fs, root: str, path: str, reports: list[dict], records: list[dict], *,
                  complete: bool, manifest_rows: int, tag: str) -> dict:
    """`_SUCCESS.json`, written last: its presence means the output passed its check, every row of
    the units the run covered is in data/ or errors/ and every shard listed in it is complete.
    `complete` is false after a --limit run that left units to do. `reports`: every run's, this one last."""
    from pipelines.output import put_json

    report = reports[-1]
    shards = [r for r in records if r["file"].startswith("data/")]
    errors = [r for r in records if r["file"].startswith("errors/")]
    runs = [{k: v for k, v in r.items() if k != "records"} for r in reports]
    summary = {
        "output": path,
        "complete": complete,
        "limit": None if complete else report["limit"],
        "manifest_rows": manifest_rows,
        "rows": sum(s["rows"] for s in shards),
        "failed_rows": sum(s["rows"] for s in errors),
        "rows_skipped": report["rows_skipped"],
        "rows_computed": report["rows_computed"],
        "rows_retried": report["rows_retried"],
        "oom_splits": sum(r["oom_splits"] for r in runs),
        "shards": shards,
        "error_shards": errors,
        "wall_time_s": report["wall_time_s"],
        "images_per_s": report["images_per_s"],
        "ray_startup_s": report["ray_startup_s"],
        "runs": runs,
        "finished_at": report["finished_at"],
        # storage_options are excluded from dumps; URLs may still carry user:password@
        "config": json.loads(redact(json.dumps(config.model_dump(mode="json")), config.storage_options)),
    }
    put_json(fs, root, SUMMARY, summary, tag)
    return summary
