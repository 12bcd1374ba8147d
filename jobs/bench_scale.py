"""Scale benchmarks: planning a big manifest (driver memory and time), and throughput with and
without Ray Data's order preservation.

`plan`: for each size, a synthetic manifest (id, prompt, seed; files of at most 1M rows) is planned
by `kandinsky-batch run --dry-run` in its own process: footers and identities in the driver, every
row checked by Ray tasks (one per file, then one per id-hash bucket), the output inspected. The
driver's peak RSS (getrusage) and the wall time are reported; no image is computed.

`order`: the same small job twice, with `preserve_order` as the engine used it before units came
from the files, and without it (the engine's way now).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

FILE_ROWS = 1_000_000


def synthetic_manifest(folder: Path, rows: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n, start in enumerate(range(0, rows, FILE_ROWS)):
        count = min(FILE_ROWS, rows - start)
        ids = pa.array([f"row-{i:09d}" for i in range(start, start + count)])
        prompts = pa.array([f"a lighthouse at dusk, study {i % 997}" for i in range(start, start + count)])
        pq.write_table(pa.table({"id": ids, "prompt": prompts, "seed": pa.array(range(start, start + count), pa.int64())}),
                       folder / f"part-{n:04d}.parquet", row_group_size=128 * 1024)


def plan(sizes: list[int], workdir: Path, cache_dir: str) -> list[dict]:
    results = []
    for rows in sizes:
        folder = workdir / f"manifest-{rows}"
        if not folder.exists():
            synthetic_manifest(folder, rows)
        config = workdir / f"plan-{rows}.json"
        config.write_text(json.dumps({"input": {"manifest": str(folder)}, "output": {"path": str(workdir / f"out-{rows}")},
                                      "model": {"cache_dir": cache_dir}}))
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "kandinsky_engine.jobs.cli", "run", str(config), "--dry-run", "--json"],
                              capture_output=True, text=True, cwd=Path(__file__).parents[1])
        seconds = time.perf_counter() - started
        line = next((l for l in done.stdout.splitlines() if l.startswith("{")), None)
        if done.returncode or line is None:
            raise RuntimeError(f"dry run of {rows} rows failed ({done.returncode}): {done.stderr[-2000:]}")
        report = json.loads(line)
        results.append({"rows": rows, "files": report["files"], "read_tasks": report["read_tasks"],
                        "units": report["units_in_scope"], "driver_peak_rss_mb": report["driver_peak_rss_mb"],
                        "plan_s": round(seconds, 1), "ray_startup_s": report["ray_startup_s"]})
        print(json.dumps(results[-1]), flush=True)
    return results


def order(rows: int, steps: int, workdir: Path, cache_dir: str) -> dict:
    """Images/s of one job with preserve_order on, then off (each on a fresh output)."""
    import ray

    from kandinsky_engine.jobs.run import connect, run_job
    from kandinsky_engine.config import JobConfig

    manifest = workdir / "order.parquet"
    pq.write_table(pa.table({"id": [f"o{i:05d}" for i in range(rows)], "prompt": [f"a red kite {i}" for i in range(rows)]}),
                   manifest)
    connect(None)
    figures = {}
    for preserve in (True, False):
        config = JobConfig.model_validate({
            "input": {"manifest": str(manifest), "rows_per_block": 8}, "output": {"path": str(workdir / f"order-{preserve}")},
            "model": {"cache_dir": cache_dir},
            "defaults": {"width": 64, "height": 64, "num_inference_steps": steps, "prior_num_inference_steps": steps}})
        ray.data.DataContext.get_current().execution_options.preserve_order = preserve
        started = time.perf_counter()
        summary = run_job(config, overwrite=True)
        figures[f"preserve_order_{str(preserve).lower()}_images_per_s"] = round(summary["rows"] / (time.perf_counter() - started), 3)
    ray.data.DataContext.get_current().execution_options.preserve_order = False
    figures["ratio_without_over_with"] = round(figures["preserve_order_false_images_per_s"]
                                               / figures["preserve_order_true_images_per_s"], 3)
    return {"rows": rows, "steps": steps, **figures}


def run(args) -> dict:
    from kandinsky_engine.families.tiny import ensure_tiny_model

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kandinsky-bench-scale-"))
    cache_dir = str(workdir / "cache")
    ensure_tiny_model(cache_dir)
    result = {}
    if args.plan:
        result["plan"] = plan([int(n) for n in args.plan.split(",")], workdir, cache_dir)
    if args.order:
        result["order"] = order(args.rows, args.steps, workdir, cache_dir)
    return result
