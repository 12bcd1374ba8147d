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
    }
