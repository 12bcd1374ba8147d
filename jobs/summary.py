"""What a run writes and returns at its end: `_SUCCESS.json`, the timeline of its commits, the GPUs
it reserved, and the plan of a dry run."""

from __future__ import annotations

import json

from kandinsky_engine.config import JobConfig
from kandinsky_engine.storage import redact
from kandinsky_engine.pipelines.output import INDEX, SUMMARY


def gpus_reserved(config: JobConfig, manifest) -> float:
    """GPUs the run's actor pools held: what a cluster bills for, busy or not."""
    from kandinsky_engine.pipelines.generate import model_stages

    stages = [config.decoder] if config.fuse_stages else [stage for _, _, stage, _ in model_stages(config, manifest)]
    return round(sum(stage.num_gpus * stage.actors for stage in stages), 4)


def timeline(committed_at: list[float], started_at: float, wall: float) -> dict | None:
    """When units were committed, in seconds from the start of the plan's execution: `fill` until the
    first unit was written (actor start-up and the first unit's way through every stage), `steady`
    until the last one, `drain` from it to the end of the write."""
    if not committed_at:
        return None
    first, last = min(committed_at) - started_at, max(committed_at) - started_at
    return {"fill": round(first, 3), "steady": round(last - first, 3), "drain": round(max(wall - last, 0.0), 3),
            "units": len(committed_at)}


def dry_run_report(config, manifest, stops, found, rows_per_block, ray_startup_s) -> dict:
    """What a run would do. The read tasks are built as a run builds them (they are most of the
    driver's plan at scale), so the peak RSS reported is the run's."""
    import resource

    from kandinsky_engine.pipelines.reconcile import FilePlan
    from kandinsky_engine.pipelines.read import ManifestUnits
    from kandinsky_engine.units import file_key

    committed = sum(len(v) for k, v in found.data.items())
    done = {}
    for unit in found.data:
        key, start = unit.rsplit("/", 1)
        done.setdefault(key, set()).add(int(start))
    plans = [FilePlan(f, stop, done.get(file_key(f.relpath), set())) for f, stop in zip(manifest.files, stops)]
    read_tasks = len(ManifestUnits(plans, rows_per_block, config.storage_options).get_read_tasks(-1))
    # Rows of the scope already in data/ and in errors/ (those run again), from the shards' records.
    in_scope = [f"{file_key(f.relpath)}/{start}" for f, stop in zip(manifest.files, stops)
                for start in range(0, stop, rows_per_block)]
    rows = {kind: sum(found.records[s.file]["rows"] for unit in in_scope for s in shards.get(unit, [])
                      if s.file in found.records) for kind, shards in (("data", found.data), ("errors", found.errors))}
    return {"dry_run": True, "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "manifest_rows": manifest.num_rows, "files": len(manifest.files), "read_tasks": read_tasks,
            "rows_in_scope": sum(stops), "units_in_scope": sum(-(-s // rows_per_block) for s in stops),
            "rows_per_block": rows_per_block, "committed_shards": committed, "rows_committed": rows["data"],
            "rows_failed_before": rows["errors"], "rows_to_run": sum(stops) - rows["data"],
            "failing_validation": len(manifest.row_errors), "changed_files": sorted(found.changed),
            "ray_startup_s": round(ray_startup_s, 3)}


def format_plan(plan: dict) -> str:
    """A dry run's plan (`dry_run_report`) for people: what the run would read, skip and compute."""
    scope, rows = plan["rows_in_scope"], plan["manifest_rows"]
    lines = [
        "dry run: nothing was written",
        f"  manifest: {rows} rows in {plan['files']} file(s), read by {plan['read_tasks']} read task(s)",
        f"  scope: {'all ' if scope == rows else ''}{scope} rows{'' if scope == rows else f' of {rows} (--limit)'} "
        f"in {plan['units_in_scope']} unit(s) of up to {plan['rows_per_block']} rows",
        f"  committed already: {plan['rows_committed']} rows in {plan['committed_shards']} data shard(s)",
        f"  to run: {plan['rows_to_run']} rows" + (f", {plan['rows_failed_before']} of them failed before and are "
                                                   f"retried" if plan["rows_failed_before"] else ""),
        f"  failing validation: {plan['failing_validation']} row(s)"
        + (" (they go to errors/, the others run)" if plan["failing_validation"] else ""),
    ]
    if plan["changed_files"]:
        shown = ", ".join(plan["changed_files"][:5]) + (" ..." if len(plan["changed_files"]) > 5 else "")
        lines.append(f"  changed since committed: {len(plan['changed_files'])} file(s), recomputed: {shown}")
    lines.append(f"  driver: peak memory {plan['driver_peak_rss_mb']:.0f} MB; Ray start-up {plan['ray_startup_s']:.1f} s")
    return "\n".join(lines)


def limit_note(limit: int | None, stops: list[int], rows_per_block: int) -> str | None:
    """What `--limit N` covers when whole units take it past N rows."""
    if limit is None or sum(stops) <= limit:
        return None
    return f"--limit {limit} covers {sum(stops)} rows (whole units of {rows_per_block})"


def write_summary(config: JobConfig, fs, root: str, path: str, reports: list[dict], records: list[dict], check,
                  manifest, tag: str) -> dict:
    """`_SUCCESS.json`, then the dataset card and shard list (pipelines/card.py). Its presence means
    the output passed its check, every row of the units the run covered is in data/ or errors/, and
    every shard in `_index.parquet` is complete. Small at any scale: counts, one line per manifest
    file, the runs' reports. `reports`: every run's, this one last."""
    from kandinsky_engine.columns import output_schema
    from kandinsky_engine.identity import model_identity
    from kandinsky_engine.pipelines.card import write_card
    from kandinsky_engine.pipelines.output import put_json

    report = reports[-1]
    runs = [{k: v for k, v in r.items() if k != "records"} for r in reports]
    complete = all(f["complete"] for f in check.files)
    summary = {
        "output": path,
        "complete": complete,
        "limit": None if complete else report["limit"],
        "manifest_rows": manifest.num_rows,
        "rows": check.rows,
        "failed_rows": check.failed_rows,
        "rows_skipped": report["rows_skipped"],
        "rows_computed": report["rows_computed"],
        "rows_retried": report["rows_retried"],
        "oom_splits": sum(r["oom_splits"] for r in runs),
        "shards": sum(1 for r in records if r["file"].startswith("data/")),
        "error_shards": sum(1 for r in records if r["file"].startswith("errors/")),
        "index": INDEX,
        "files": check.files,
        "wall_time_s": report["wall_time_s"],
        "images_per_s": report["images_per_s"],
        "ray_startup_s": report["ray_startup_s"],
        "runs": runs,
        "finished_at": report["finished_at"],
        # storage_options are excluded from dumps; URLs may still carry user:password@
        "config": json.loads(redact(json.dumps(config.model_dump(mode="json")), config.storage_options)),
    }
    put_json(fs, root, SUMMARY, summary, tag)
    write_card(fs, root, config, output_schema(manifest.schema, config.output.columns), summary, records,
               model_identity(config.model, recorded_weights(fs, root)), tag)  # after the summary, never before
    return summary


def recorded_weights(fs, root: str) -> dict[str, str]:
    """{part: weights digest} as the output's _RUN.json records them (what its rows were made with)."""
    from .resume import read_run

    return {part: model["weights"] for part, model in read_run(fs, root)["inputs"]["models"].items()}
