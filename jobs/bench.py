"""Benchmark: the Ray job vs a plain single-process diffusers loop, same tiny model, same rows.

Both sides produce encoded PNGs for N rows with the seed rule; one run prints both throughputs
and their ratio. Ray start-up is reported separately; the job's time includes its actors
loading the models, the loop's time excludes its (one-off) pipeline loading, reported apart.
"""

from __future__ import annotations

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


def diffusers_loop(root: Path, rows: list[dict], defaults) -> tuple[float, float]:
    """Returns (load seconds, generation seconds) of the reference loop, PNG encoding included."""
    import torch
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    from kandinsky_engine.movq import encode_image

    start = time.perf_counter()
    prior = KandinskyV22PriorPipeline.from_pretrained(root / "prior")
    decoder = KandinskyV22Pipeline.from_pretrained(root / "decoder")
    for pipe in (prior, decoder):
        pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    for row in rows:
        emb = prior(row["prompt"], num_inference_steps=defaults.prior_num_inference_steps,
                    guidance_scale=defaults.prior_guidance_scale, generator=torch.Generator().manual_seed(row["seed"]))
        image = decoder(emb.image_embeds, emb.negative_image_embeds, height=defaults.height, width=defaults.width,
                        num_inference_steps=defaults.num_inference_steps, guidance_scale=defaults.guidance_scale,
                        generator=torch.Generator().manual_seed(row["seed"]), output_type="np").images[0]
        encode_image((image * 255).round().astype("uint8"), "png", 95)
    return loaded - start, time.perf_counter() - loaded


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
                     "prior_num_inference_steps": args.steps},
    }
    config = JobConfig.model_validate(apply_overrides(data, args.set or []))

    ray_startup = connect(None)
    started = time.perf_counter()
    summary = run_job(config, overwrite=True)
    job_s = time.perf_counter() - started

    load_s, loop_s = diffusers_loop(root, rows, config.defaults)
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
        "stages": {s: getattr(config, s).model_dump() for s in ("prior", "decoder", "movq")},
        "ray_startup_s": round(ray_startup, 2),
        "ray_job_s": round(job_s, 2),
        "ray_job_images_per_s": round(summary["rows"] / job_s, 3),
        "diffusers_load_s": round(load_s, 2),
        "diffusers_loop_s": round(loop_s, 2),
        "diffusers_images_per_s": round(args.rows / loop_s, 3),
        "ratio_ray_over_diffusers": round((summary["rows"] / job_s) / (args.rows / loop_s), 3),
        "per_task_ray_job": per_task,
    }
