"""Benchmark: the Ray job vs the loop a user would write (both diffusers pipelines, batched, a list
of per-row generators), same tiny model, same rows, same thread budget.

Both sides produce encoded PNGs for N rows with the seed rule; one run prints both throughputs
and their ratios: end to end (the job with its planning, actor start-up and pipeline fill; the
loop without its one-off pipeline loading, printed apart), and excluding start-up (the job from
its first committed unit on). The breakdown comes from the job's own timeline (when units were
committed) and Ray Data's per-operator stats. Ray start-up is printed apart.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PROMPTS = ["a red cat", "Красный кот", "一只猫", "🐱 in space", "a harbour at dawn", "abstract bauhaus poster"]
# The tiny decoder each task runs on.
TASK_DECODER = {"text2img": "tiny", "img2img": "tiny", "mix": "tiny", "variation": "tiny",
                "inpaint": "tiny-inpaint", "controlnet": "tiny-controlnet", "controlnet_img2img": "tiny-controlnet"}


def png(array) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def task_rows(task: str, n: int, size: int) -> list[dict]:
    """N rows of one task with synthetic inputs (noise images, a centred square mask)."""
    import numpy as np

    rng = np.random.default_rng(0)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    rows = []
    for i in range(n):
        image = png(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        row = {"id": f"{task}-{i:05d}", "prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "task": task}
        if task in ("img2img", "variation", "controlnet_img2img", "inpaint", "controlnet"):
            row["image_bytes"] = image  # controlnet: its hint is estimated from this image
        if task in ("img2img", "variation", "controlnet_img2img"):
            row["strength"] = 0.6
        if task == "inpaint":
            row["mask_bytes"] = png(mask)
        if task == "mix":
            row["mix"] = [{"text": PROMPTS[(i + 1) % len(PROMPTS)], "weight": 0.5}, {"image_bytes": image, "weight": 0.5}]
        rows.append(row)
    return rows


def diffusers_loop(root: Path, rows: list[dict], defaults, batch_size: int, threads: int) -> tuple[float, float]:
    """The loop a user writes: both diffusers pipelines, `batch_size` rows per call with a list of
    per-row generators (the seed rule), PNG encoding included. Returns (load s, generation s)."""
    import torch
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    from kandinsky_engine.stages.movq import encode_image

    torch.set_num_threads(threads)
    start = time.perf_counter()
    prior = KandinskyV22PriorPipeline.from_pretrained(root / "prior")
    decoder = KandinskyV22Pipeline.from_pretrained(root / "decoder")
    for pipe in (prior, decoder):
        pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        generators = lambda: [torch.Generator().manual_seed(r["seed"]) for r in chunk]  # noqa: E731
        emb = prior([r["prompt"] for r in chunk], num_inference_steps=defaults.prior_num_inference_steps,
                    guidance_scale=defaults.prior_guidance_scale, generator=generators())
        images = decoder(emb.image_embeds, emb.negative_image_embeds, height=defaults.height, width=defaults.width,
                         num_inference_steps=defaults.num_inference_steps, guidance_scale=defaults.guidance_scale,
                         generator=generators(), output_type="np").images
        for image in images:
            encode_image((image * 255).round().astype("uint8"), "png", 95)
    return loaded - start, time.perf_counter() - loaded


def operator_times(stats: str | None) -> dict[str, float]:
    """Per operator, the total remote wall time (s) from Ray Data's stats text."""
    import re

    times, name = {}, None
    for line in (stats or "").splitlines():
        header = re.match(r"Operator \d+ (.+?): \d+ tasks executed", line)
        if header:
            name = header.group(1)
        wall = re.match(r"\* Remote wall time: .* ([\d.]+)(ms|s|us) total", line)
        if name and wall:
            times[name] = round(float(wall.group(1)) / {"s": 1, "ms": 1e3, "us": 1e6}[wall.group(2)], 3)
            name = None
    return times


def run_bench(args) -> dict:
    from jobs.run import connect, run_job
    from kandinsky_engine.config import JobConfig, apply_overrides
    from kandinsky_engine.tiny import ensure_tiny_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="kandinsky-bench-"))
    cache = work / "cache"
    root = ensure_tiny_model(cache)
    rows = [{"id": f"bench-{i:05d}", "prompt": PROMPTS[i % len(PROMPTS)], "seed": i} for i in range(args.rows)]
    pq.write_table(pa.Table.from_pylist(rows), work / "manifest.parquet")
    data = {
        "input": {"manifest": str(work / "manifest.parquet")},
        "output": {"path": str(work / "out")},
        "model": {"cache_dir": str(cache)},
        "defaults": {"width": args.size, "height": args.size, "num_inference_steps": args.steps,
                     "prior_num_inference_steps": args.prior_steps or args.steps},
    }
    config = JobConfig.model_validate(apply_overrides(data, args.set or []))

    threads = args.threads or os.cpu_count() or 1
    ray_startup = connect(None)
    started = time.perf_counter()
    summary = run_job(config, overwrite=True)
    job_s = time.perf_counter() - started
    timeline = summary["runs"][-1]["timeline_s"] or {}
    # Start-up inside the job: planning and validation before the plan runs, then the time to the
    # first committed unit (actors loading their models, and that unit's own way through every
    # stage, which a loop also pays). Excluding start-up: from the first commit to the end.
    first_unit_s = job_s - summary["wall_time_s"] + timeline.get("fill", 0.0)
    rows_after_first = summary["rows"] - min(summary["rows"], config.rows_per_block())
    steady_s = max(job_s - first_unit_s, 1e-9)

    load_s, loop_s = diffusers_loop(root, rows, config.defaults, args.loop_batch, threads)
    load1_s, loop1_s = diffusers_loop(root, rows, config.defaults, 1, threads) if args.batch1 else (None, None)
    loop_rate = args.rows / loop_s
    per_task = {}
    tasks = list(TASK_DECODER) if args.tasks == "all" else (args.tasks or "").split(",")
    for task in [t for t in tasks if t and t != "text2img"]:
        manifest = work / f"manifest-{task}.parquet"
        pq.write_table(pa.Table.from_pylist(task_rows(task, args.rows, args.size)), manifest)
        task_data = apply_overrides({**data, "input": {"manifest": str(manifest)}, "output": {"path": str(work / task)},
                                     "model": {"cache_dir": str(cache), "decoder": TASK_DECODER[task]}}, args.set or [])
        started = time.perf_counter()
        task_summary = run_job(JobConfig.model_validate(task_data), overwrite=True)
        seconds = time.perf_counter() - started
        per_task[task] = {"rows": task_summary["rows"], "failed": task_summary["failed_rows"],
                          "ray_job_s": round(seconds, 2), "images_per_s": round(task_summary["rows"] / seconds, 3)}
    return {
        "rows": args.rows,
        "size": f"{args.size}x{args.size}",
        "steps": args.steps,
        "prior_steps": args.prior_steps or args.steps,
        "rows_per_unit": config.rows_per_block(),
        "stages": {s: getattr(config, s).model_dump(include={"batch_size", "actors", "num_cpus", "torch_threads"})
                   for s in ("prior", "decoder", "movq")},
        "ray_startup_s": round(ray_startup, 2),
        "ray_job_s": round(job_s, 2),
        "ray_job_images_per_s": round(summary["rows"] / job_s, 3),
        "breakdown_s": {"ray_start": round(ray_startup, 2), "plan_and_validate": round(job_s - summary["wall_time_s"], 2),
                        "first_unit (actor start + fill)": round(timeline.get("fill", 0.0), 2),
                        "steady": timeline.get("steady"), "drain": timeline.get("drain"),
                        "operators_remote_wall": operator_times(summary.get("ray_data_stats"))},
        "ray_job_images_per_s_after_first_unit": round(rows_after_first / steady_s, 3),
        f"diffusers_batch{args.loop_batch}_loop_s": round(loop_s, 2),
        f"diffusers_batch{args.loop_batch}_images_per_s": round(loop_rate, 3),
        "diffusers_threads": threads,
        "diffusers_load_s": round(load_s, 2),
        "diffusers_batch1_images_per_s": round(args.rows / loop1_s, 3) if loop1_s else None,
        "ratio_end_to_end": round((summary["rows"] / job_s) / loop_rate, 3),
        "ratio_excluding_startup": round((rows_after_first / steady_s) / loop_rate, 3),
        "ratio_vs_batch1_loop": round((summary["rows"] / job_s) / (args.rows / loop1_s), 3) if loop1_s else None,
        "per_task_ray_job": per_task,
    }
