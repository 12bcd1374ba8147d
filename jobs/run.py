"""Run a job: validate, connect to Ray, build, write, summarise."""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone

import fsspec
import pyarrow.parquet as pq

from kandinsky_engine.config import JobConfig
from kandinsky_engine.manifest import validate_manifest
from kandinsky_engine.models import check_source
from kandinsky_engine.storage import url_to_fs

log = logging.getLogger("kandinsky_engine")
SUMMARY = "_SUCCESS.json"


class OutputExistsError(RuntimeError):
    pass


def prepare_output(config: JobConfig, overwrite: bool) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = url_to_fs(config.output.path, config.storage_options)
    if fs.exists(root) and fs.ls(root):
        if not overwrite:
            raise OutputExistsError(
                f"output {config.output.path} is not empty; choose another output.path or pass --overwrite to replace it"
            )
        fs.rm(root, recursive=True)
    fs.makedirs(root, exist_ok=True)
    return fs, root


def connect(address: str | None) -> float:
    """Attach to `address` (or RAY_ADDRESS); otherwise start a local cluster. Returns seconds taken."""
    import ray

    start = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    return time.perf_counter() - start


def run_job(config: JobConfig, *, address: str | None = None, overwrite: bool = False, limit: int | None = None) -> dict:
    # Everything that can fail fast does so before Ray starts or a model loads, and before an
    # existing output is touched (--overwrite deletes it only once the job can run).
    manifest = validate_manifest(config)
    for part in ("prior", "decoder"):
        # Builds 'tiny' once, checks local dirs; a remote dir is listed, not downloaded (actors do that).
        check_source(getattr(config.model, part), part, config.model.cache_dir, config.storage_options)
    ray_startup_s = connect(address or config.ray_address)

    import ray

    from pipelines.generate import IO_CPUS, build_generation, check_resources
    from pipelines.sink import ShardSink

    check_resources(config, manifest, ray.cluster_resources())
    fs, root = prepare_output(config, overwrite)

    log.info("manifest: %d rows in %d file(s)", manifest.num_rows, len(manifest.files))
    started = time.perf_counter()
    ds = build_generation(config, manifest, limit=limit)
    ds.write_datasink(ShardSink(config.output, config.storage_options), ray_remote_args={"num_cpus": IO_CPUS})
    wall = time.perf_counter() - started
    summary = write_summary(config, fs, root, wall, ray_startup_s)
    expected = min(manifest.num_rows, limit or manifest.num_rows)
    if summary["rows"] + summary["failed_rows"] != expected:
        raise RuntimeError(f"wrote {summary['rows']} + {summary['failed_rows']} failed rows, expected {expected}")
    return summary


def list_shards(fs, folder: str) -> list[dict]:
    shards = []
    for path in sorted(fs.glob(f"{folder}/*.parquet")):
        with fs.open(path, "rb") as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        shards.append({"file": path.rsplit("/", 1)[-1], "rows": rows, "bytes": fs.size(path)})
    return shards


def write_summary(config: JobConfig, fs, root: str, wall: float, ray_startup_s: float) -> dict:
    """`_SUCCESS.json`, written last: its presence means every shard listed in it is complete."""
    shards, errors = list_shards(fs, f"{root}/data"), list_shards(fs, f"{root}/errors")
    total = sum(s["rows"] for s in shards)
    summary = {
        "rows": total,
        "failed_rows": sum(s["rows"] for s in errors),
        "shards": shards,
        "error_shards": errors,
        "wall_time_s": round(wall, 3),
        "images_per_s": round(total / wall, 4) if wall else None,
        "ray_startup_s": round(ray_startup_s, 3),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "config": config.model_dump(mode="json"),
    }
    with fs.open(f"{root}/{SUMMARY}", "w") as f:
        json.dump(summary, f, indent=2)
    return summary
