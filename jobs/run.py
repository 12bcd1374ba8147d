"""Run a job: validate, connect to Ray, build, write, summarise."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from datetime import datetime, timezone

from kandinsky_engine.columns import output_schema
from kandinsky_engine.config import JobConfig
from kandinsky_engine.families import resolve_family
from kandinsky_engine.hub import pin
from kandinsky_engine.identity import model_identity, weights_digests
from kandinsky_engine.manifest import ManifestError, plan_files, unified_schema, validate_manifest
from kandinsky_engine.units import limit_stops
from kandinsky_engine.model_cache import check_cache_dir
from kandinsky_engine.models import resolve_sources
from kandinsky_engine.text_manifest import publish
from kandinsky_engine.storage import access_checked, ensure_dir, remove_file, remove_tree, url_to_fs
from kandinsky_engine.pipelines.auto_layout import auto_layout
from kandinsky_engine.pipelines.output import INDEX, RUNS, SUMMARY, TMP, LeaseLost, lease_owner

from .output_guard import check_output as check_target
from .lease import Lease
from .progress import Console, JobLog, RunProgress
from .signals import reinstall
from .output_guard import remove_owned
from .history import read_known, read_reports
from .resume import (ForeignFiles, ManifestChanged, changed_message, choose_output, conflict_message,  # noqa: F401
                     fingerprint_inputs, foreign_message, log_gone, note_device, with_gpu, write_run)
from .summary import dry_run_report, gpus_reserved, limit_note, timeline, write_summary
from .verify import check_output
from .verify import report as verify_report

log = logging.getLogger("kandinsky_engine")


def _lost(path: str) -> str:
    return (f"output {path}: another run took over this run's lease while it ran: this run stopped committing, and "
            f"its report and {SUMMARY} are not written (the other run resumes the output)")


def connect(address: str | None, verbose: bool = False) -> float:
    """Attach to `address` (or RAY_ADDRESS); otherwise start a local cluster. Returns seconds taken.
    Workers' output (model loading, weight-loading bars) stays in Ray's session logs unless `verbose`."""
    import ray

    start = time.perf_counter()
    if not ray.is_initialized():
        # "local" starts a fresh cluster: with no address, ray.init would attach to whatever cluster
        # was started last on this machine (`ray start`, another test), which is not what was asked.
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=verbose)
        reinstall()  # Ray replaced the SIGTERM handler (jobs/signals.py)
    return time.perf_counter() - start


def run_job(config: JobConfig, *, address: str | None = None, overwrite: bool = False, limit: int | None = None,
            new_run: bool = False, recompute_changed: bool = False, check_shards: bool = False,
            overwrite_unowned: bool = False, config_file: str | None = None, wait: bool = False,
            dry_run: bool = False, console: Console | None = None, allow_device_change: bool = False) -> dict:
    """Run (or resume) a job. Returns the summary that is also written to PATH/_SUCCESS.json, plus
    the shard records (`shards`, `error_shards`), which the file keeps in PATH/_index.parquet.

    `limit`: only the first N rows (whole units); `recompute_changed`: rerun the committed units of
    manifest files that changed instead of refusing; `check_shards`: compare every committed shard's
    sha256 with its record before resuming (reads the whole output), not only its size;
    `overwrite_unowned` also overwrites a folder this tool did not write or that holds the manifest
    or `config_file` (see jobs/output_guard.py); `wait`: if another run holds the output's lease,
    wait for it instead of failing; `dry_run`: plan, validate and inspect, print, write nothing;
    `console`: progress lines and the log file (jobs/progress.py; default: silent, progress file only);
    `allow_device_change`: resume an output computed on another GPU model or library build (recorded).
    """
    console = console or Console()
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    # Everything that can fail fast does so before Ray starts or a model loads, and before an
    # existing output is touched (--overwrite deletes it only once the job can run).
    check_cache_dir(config.model.cache_dir)
    planned = plan_files(config)  # file metadata only: footers and identities, no rows
    if planned[3]:
        raise ManifestError("invalid manifest:\n  " + "\n  ".join(planned[3][:20]))
    schema_in = unified_schema(planned[2])
    overwrite = overwrite or overwrite_unowned
    with access_checked(config.output.path, config.storage_options, "checking output"):
        check_target(config, overwrite=overwrite, unowned=overwrite_unowned, config_file=config_file)
    # Hub ids become repo@commit first (the decoder names the family), so the hub is asked once per id.
    config = config.model_copy(update={"model": pin(config.model, ("decoder",))})
    # Each model source is resolved once, here: checked ('tiny' built, local dirs checked; a remote dir is
    # listed, not downloaded: actors do that) and identified. The fingerprint and the stages take the values.
    decoder = resolve_sources(config.model, ("decoder",), config.storage_options)
    device_was_auto = config.model.device == "auto"
    config, family = resolve_family(config)  # the decoder's pipeline names it; from here on, the stages' config
    parts = family.used_parts(config.model, config.storage_options)
    config = config.model_copy(update={"model": pin(config.model, parts)})
    sources = resolve_sources(config.model, parts, config.storage_options, resolved=decoder)
    if tiny := [p for p in parts if getattr(config.model, p).startswith("tiny")]:
        log.warning("model.%s: the tiny random model (offline tests and the demo): its images are noise; name "
                    "real weights for real images (the default is the released Kandinsky 2.2)", "/".join(tiny))
    if config.model.device == "cpu" and not tiny and device_was_auto and not (address or config.ray_address):
        import torch

        if torch.cuda.is_available():  # 'auto' is cuda only where the config reserves GPUs (device.resolve_auto)
            log.warning("model.device auto resolved to cpu (no stage reserves a GPU), but this machine has %s: set "
                        "model.device: cuda for the engine's GPU layout", torch.cuda.get_device_name(0))
    weights = weights_digests(sources)
    inputs = fingerprint_inputs(config, schema_in, weights)
    with access_checked(config.output.path, config.storage_options, "checking output"):
        path, mode = choose_output(config, inputs, overwrite=overwrite, new_run=new_run)
    if path != config.output.path.rstrip("/"):
        log.info("this job differs from the run in %s: writing it beside, to %s", config.output.path, path)
    fs, root = url_to_fs(path, config.storage_options)
    if not dry_run and any(f.frozen for f in planned[1]):  # CSV/JSONL copies, where every worker reads them
        planned = (planned[0], publish(planned[1], path, config.storage_options), *planned[2:])
    ray_startup_s = connect(address or config.ray_address, console.verbose)
    inputs = with_gpu(config, inputs)  # the GPU the job computes on (CUDA jobs), compared on resume
    from kandinsky_engine.pipelines.validate import check_with_ray

    # Rows are checked by Ray tasks, one per file: still before the output is touched.
    manifest = validate_manifest(config, checker=check_with_ray, planned=planned)
    config = config.model_copy(update={"tasks": sorted(manifest.tasks)})  # stages keep only the models these need
    config = auto_layout(config, manifest)  # where the config sets no layout: the fastest known for this cluster
    lease = Lease(fs, root, config.output.lease_ttl_s, path)
    if not dry_run:
        ensure_dir(fs, root)
        lease.acquire(wait=wait)  # before anything below reads what a live run may be changing
    cleanup = contextlib.ExitStack()  # the job log, opened once the output is ours
    try:
        if not dry_run:  # again, now that no other run can change the output under us
            with access_checked(config.output.path, config.storage_options, "checking output"):
                path, mode = choose_output(config, inputs, overwrite=overwrite, new_run=new_run,
                                           allow_device_change=allow_device_change)
        return _run(config, path, mode, fs, root, manifest, inputs, weights, lease, ray_startup_s, sources=sources,
                    limit=limit, recompute_changed=recompute_changed, check_shards=check_shards, dry_run=dry_run,
                    console=console, cleanup=cleanup)
    finally:
        cleanup.close()
        if not dry_run:
            lease.release()


def _run(config, path, mode, fs, root, manifest, inputs, weights, lease, ray_startup_s, *, sources, limit,
         recompute_changed, check_shards, dry_run, console, cleanup) -> dict:
    import ray

    from kandinsky_engine.pipelines.generate import IO_CPUS, build_generation, check_resources
    from kandinsky_engine.pipelines.output import put_json, put_records
    from kandinsky_engine.pipelines.progress import CommitCounter
    from kandinsky_engine.pipelines.reconcile import Inspection, inspect, reconcile, shard_records
    from kandinsky_engine.pipelines.sink import ShardSink
    from kandinsky_engine.pipelines.sources import Gone, apply_gone, plan_gone, read_registry, write_registry

    rows_per_block = config.rows_per_block()
    tag = uuid.uuid4().hex[:12]  # this run: its report, temporary files, quarantine folder
    files = manifest.files
    stops = limit_stops(files, limit, rows_per_block)
    earlier, damaged_reports = read_reports(fs, root) if mode == "resume" else ([], [])
    known = read_known(fs, root, earlier, damaged_reports)
    found = inspect(fs, root, files, rows_per_block, known, deep=check_shards) if mode == "resume" else Inspection()
    # Every refusal comes before anything in the output changes.
    if found.foreign:
        raise ForeignFiles(foreign_message(path, found.foreign))
    if found.changed and not recompute_changed:
        raise ManifestChanged(changed_message(path, found.changed))
    registry = read_registry(fs, root) if mode == "resume" else {}
    gone = plan_gone(fs, found, files, registry, rows_per_block, config.storage_options) if found.gone else Gone()
    if gone.conflicts and not recompute_changed:
        raise ManifestChanged(conflict_message(path, gone.conflicts))
    check_resources(config, manifest, ray.cluster_resources())
    if note := limit_note(limit, stops, rows_per_block):
        console.say(note)
    if dry_run:
        return dry_run_report(config, manifest, stops, found, rows_per_block, ray_startup_s)
    if mode == "overwrite":
        remove_owned(fs, root)
    if mode != "resume":
        write_run(fs, root, inputs, config, tag)
    else:
        note_device(fs, root, inputs, tag)  # a GPU other than the output's last one: recorded in _RUN.json
    job_log = JobLog(fs, root, tag) if console.log_file else None
    if job_log:
        cleanup.callback(job_log.close)
    remove_file(fs, f"{root}/{SUMMARY}")  # the output is incomplete again until this run ends

    adopted = {}
    if gone.changes:
        adopted = apply_gone(fs, root, gone, tag, known)
        log_gone(path, gone, tag)
        found = inspect(fs, root, files, rows_per_block, {**known, **adopted}, deep=check_shards)
    if found.gone:
        log.warning("%d folder(s) of shards in %s/data belong to files no longer in the manifest (%s): left as they "
                    "are (none of their ids is in the manifest)", len(found.gone), path, ", ".join(list(found.gone)[:5]))
    write_registry(fs, root, files, registry, set(found.gone), tag)  # before any unit of these files commits
    state = reconcile(fs, root, files, stops, rows_per_block, found, tag)
    log.info("manifest: %d rows in %d file(s); units of %d rows%s; already committed: %d rows; to run: %d rows "
             "(%d retried)%s", manifest.num_rows, len(files), rows_per_block,
             f"; --limit {limit} covers {sum(stops)} rows" if limit else "", state.rows_done, state.rows_todo,
             state.rows_retried, f"; removed stale {', '.join(state.cleaned[:10])}" if state.cleaned else "")
    if state.recomputed:
        log.warning("manifest rows changed in %d committed unit(s) (%s): their shards were removed and they run "
                    "again", len(state.recomputed), ", ".join(state.recomputed[:10]))
    if state.damaged or damaged_reports:
        log.warning("damaged and set aside in %s/_damaged/%s: %s; their units run again", path, tag,
                    ", ".join(state.damaged + damaged_reports))
    if manifest.row_errors:
        log.warning("%d row(s) failed validation and go to errors/, e.g. %s", len(manifest.row_errors),
                    next(iter(manifest.row_errors.values())))
    started, started_at = time.perf_counter(), time.time()
    schema = output_schema(manifest.schema, config.output.columns)
    progress = None
    if state.rows_todo:
        progress = RunProgress(fs, root, tag, state.rows_done + state.rows_todo, state.rows_done, console,
                               CommitCounter.remote(), job_log and job_log.target, alive=lambda: not lease.lost)
        progress.start()
    sink = ShardSink(path, config.storage_options, schema, model_identity(config.model, weights), tag,
                     config.output, progress=progress and progress.counter, lease_owner=lease.owner)
    ray_data_stats = None
    if state.rows_todo:
        ds = build_generation(config, manifest, state.plans, sources, progress=progress.counter)
        try:
            ds.write_datasink(sink, ray_remote_args={"num_cpus": IO_CPUS})
        except BaseException:
            progress.stop("failed")
            if lease_owner(fs, root) != lease.owner:  # the writer stopped because the lease was taken
                raise LeaseLost(_lost(path)) from None
            raise
        progress.stop("written")  # every unit is written; the run checks the output and writes its summary
        # Ray Data (2.60) keeps the executed write plan as `_write_ds`; its stats are the per-operator
        # breakdown that `bench` prints. Not part of the report: long text, and only diagnostics.
        ray_data_stats = ds._write_ds.stats() if getattr(ds, "_write_ds", None) is not None else None
    wall = time.perf_counter() - started
    if lease.lost or lease_owner(fs, root) != lease.owner:
        raise LeaseLost(_lost(path))
    # This run's record file holds what it committed, adopted or read back (never every shard again).
    this_run = {**{f: found.records[f] for f in found.read}, **adopted, **{r["file"]: r for r in sink.records}}
    records = shard_records(fs, root, {**known, **found.records, **this_run})
    report = {
        "run": tag,
        "limit": limit,
        "rows_skipped": state.rows_done,
        "rows_computed": state.rows_todo,
        "rows_retried": state.rows_retried,
        "oom_splits": sink.oom_splits,
        "compute_s": round(sink.compute_s, 3),  # model-stage seconds of the units it committed (per unit: the records)
        "cleaned": state.cleaned,
        "recomputed_units": state.recomputed,
        "damaged": state.damaged + damaged_reports,
        "files_gone": sorted(found.gone),
        "files_renamed": gone.renamed,
        "retired": sorted({s.file for s in gone.retire} | {s.file for k in gone.conflicts for s in gone.leftover[k]}),
        "wall_time_s": round(wall, 3),
        "timeline_s": timeline(sink.committed_at, started_at, wall),
        "images_per_s": round(state.rows_todo / wall, 4) if wall and state.rows_todo else None,
        "ray_startup_s": round(ray_startup_s, 3),
        "gpus_reserved": gpus_reserved(config, manifest),  # x wall time: the run's GPU-hours (`report`)
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }
    put_records(fs, root, f"{RUNS}/{tag}.parquet", list(this_run.values()), tag)
    put_json(fs, root, f"{RUNS}/{tag}.json", report, tag)
    # The invariants hold before _SUCCESS.json says so (sizes here; `verify` also checks sha256).
    check = check_output(fs, root, config, files, stops, schema, {r["file"]: r for r in records}, deep=False)
    if not check.ok:
        raise RuntimeError(f"the output failed its check, so no {SUMMARY} was written: {verify_report(check, path)}")
    put_records(fs, root, INDEX, records, tag)
    summary = write_summary(config, fs, root, path, [*earlier, report], records, check, manifest, tag)
    remove_tree(fs, f"{root}/{TMP}")  # written through by the shards and the metadata files; empty by now
    return {**summary, "shards": [r for r in records if r["file"].startswith("data/")],
            "error_shards": [r for r in records if r["file"].startswith("errors/")], "ray_data_stats": ray_data_stats,
            "log": job_log and job_log.target, "worker_logs": job_log and job_log.worker_logs}


