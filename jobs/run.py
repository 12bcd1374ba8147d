"""Run a job: validate, connect to Ray, build, write, summarise."""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone

from kandinsky_engine.config import JobConfig
from kandinsky_engine.manifest import validate_manifest
from kandinsky_engine.model_cache import check_cache_dir
from kandinsky_engine.models import check_source
from kandinsky_engine.storage import access_checked, ensure_dir, redact, url_to_fs
from pipelines.output import RUNS, SUMMARY

from .output_guard import check_output, remove_owned
from .resume import choose_output, fingerprint_inputs, write_run

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


def run_job(config: JobConfig, *, address: str | None = None, overwrite: bool = False, limit: int | None = None,
            new_run: bool = False, overwrite_unowned: bool = False, config_file: str | None = None) -> dict:
    """Run (or resume) a job. Returns the summary that is also written to PATH/_SUCCESS.json.

    `overwrite_unowned` also overwrites a folder this tool did not write or that holds the
    manifest or `config_file` (see jobs/output_guard.py)."""
    # Everything that can fail fast does so before Ray starts or a model loads, and before an
    # existing output is touched (--overwrite deletes it only once the job can run).
    check_cache_dir(config.model.cache_dir)
    manifest = validate_manifest(config)
    from pipelines.generate import IO_CPUS, build_generation, check_resources, rows_per_block

    block_rows = rows_per_block(config)
    inputs = fingerprint_inputs(config, manifest, block_rows)
    overwrite = overwrite or overwrite_unowned
    with access_checked(config.output.path, config.storage_options, "checking output"):
        check_output(config, overwrite=overwrite, unowned=overwrite_unowned, config_file=config_file)
        path, mode = choose_output(config, inputs, overwrite=overwrite, new_run=new_run)
    for part in ("prior", "decoder"):
        # Builds 'tiny' once, checks local dirs; a remote dir is listed, not downloaded (actors do that).
        check_source(getattr(config.model, part), part, config.model.cache_dir, config.storage_options)
    if path != config.output.path.rstrip("/"):
        log.info("this job differs from the run in %s: writing it beside, to %s", config.output.path, path)
    ray_startup_s = connect(address or config.ray_address)

    import ray

    from pipelines.output import TMP, cut_units, scan
    from pipelines.sink import ShardSink

    check_resources(config, manifest, ray.cluster_resources())
    fs, root = url_to_fs(path, config.storage_options)
    if mode == "overwrite":
        remove_owned(fs, root)
    if mode != "resume":
        ensure_dir(fs, root)
        write_run(fs, root, inputs)
    earlier = read_reports(fs, root)
    if fs.exists(f"{root}/{SUMMARY}"):
        fs.rm(f"{root}/{SUMMARY}")  # the output is incomplete again until this run ends

    units = cut_units(manifest.ids, block_rows, limit)
    state = scan(fs, root, units)
    todo_rows = sum(len(u.ids) if state.todo[u.index][1] is None else len(state.todo[u.index][1])
                    for u in units if u.index in state.todo)
    log.info("manifest: %d rows in %d file(s); %d units of %d rows; already committed: %d rows; to run: %d rows "
             "(%d retried)%s", manifest.num_rows, len(manifest.files), len(units), block_rows, state.rows_done,
             todo_rows, state.rows_retried, f"; removed stale {', '.join(state.cleaned)}" if state.cleaned else "")
    if manifest.row_errors:
        log.warning("%d row(s) failed validation and go to errors/, e.g. %s", len(manifest.row_errors),
                    next(iter(manifest.row_errors.values())))
    started = time.perf_counter()
    sink = ShardSink(path, config.storage_options)
    if state.todo:
        ds = build_generation(config, manifest, units, state.todo)
        ds.write_datasink(sink, ray_remote_args={"num_cpus": IO_CPUS})
    wall = time.perf_counter() - started
    if fs.exists(f"{root}/{TMP}"):
        fs.rm(f"{root}/{TMP}", recursive=True)
    report = {
        "run": sink.tmp_tag,
        "rows_skipped": state.rows_done,
        "rows_computed": todo_rows,
        "rows_retried": state.rows_retried,
        "oom_splits": sink.oom_splits,
        "cleaned": state.cleaned,
        "wall_time_s": round(wall, 3),
        "images_per_s": round(todo_rows / wall, 4) if wall and todo_rows else None,
        "ray_startup_s": round(ray_startup_s, 3),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "records": sink.records,
    }
    ensure_dir(fs, f"{root}/{RUNS}")
    with fs.open(f"{root}/{RUNS}/{sink.tmp_tag}.json", "w") as f:
        json.dump(report, f, indent=2)
    summary = write_summary(config, fs, root, path, [*earlier, report])
    expected = sum(len(u.ids) for u in units)
    if summary["rows"] + summary["failed_rows"] != expected:
        raise RuntimeError(f"{path}: {summary['rows']} rows + {summary['failed_rows']} failed rows, expected {expected}")
    return summary


def read_reports(fs, root: str) -> list[dict]:
    """Reports of earlier runs that reached their end, oldest first (a killed run wrote none)."""
    reports = []
    for name in fs.glob(f"{root}/{RUNS}/*.json"):
        with fs.open(name, "r") as f:
            reports.append(json.load(f))
    return sorted(reports, key=lambda r: r["finished_at"])


def write_summary(config: JobConfig, fs, root: str, path: str, reports: list[dict]) -> dict:
    """`_SUCCESS.json`, written last: its presence means every row is in data/ or errors/ and
    every shard listed in it is complete. `reports`: every run's, this one last."""
    from pipelines.output import shard_records

    report = reports[-1]
    # Shard records of every run (later runs rewrite files: theirs win); the shards of a killed
    # run are read back once.
    known = {r["file"]: r for rep in reports for r in rep.get("records", [])}
    records = shard_records(fs, root, known)
    shards = [r for r in records if r["file"].startswith("data/")]
    errors = [r for r in records if r["file"].startswith("errors/")]
    runs = [{k: v for k, v in r.items() if k != "records"} for r in reports]
    summary = {
        "output": path,
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
    with fs.open(f"{root}/{SUMMARY}", "w") as f:
        json.dump(summary, f, indent=2)
    return summary
