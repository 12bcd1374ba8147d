"""Benchmark: the Ray job vs the loop a user would write (the family's diffusers pipelines, batched,
a list of per-row generators), same tiny model, same rows, same thread budget. `--family` picks
Kandinsky 2.2 (default), 2.1 or 3: text2img rows on that family's tiny model on both sides.

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


# Per family, the diffusers pipelines of the loop a user writes for text2img rows: (prior or None,
# decoder, whether the decoder reads the prompt) and the tiny model (`model.*` fields) both sides run.
LOOP_PIPELINES = {
    "kandinsky22": ("KandinskyV22PriorPipeline", "KandinskyV22Pipeline", False),
    "kandinsky21": ("KandinskyPriorPipeline", "KandinskyPipeline", True),  # XLM-R text conditioning too
    "kandinsky3": (None, "Kandinsky3Pipeline", True),  # no prior: T5 text conditioning only
    "kandinsky20": None,  # no diffusers pipeline: the loop calls the family's stage classes (stages_loop)
}
TINY_MODEL = {"kandinsky22": {"prior": "tiny", "decoder": "tiny"},
              "kandinsky21": {"prior": "tiny-k21", "decoder": "tiny-k21"},
              "kandinsky3": {"decoder": "tiny-k3"},
              "kandinsky20": {"decoder": "tiny-k20"}}


def diffusers_loop(config, rows: list[dict], batch_size: int, threads: int) -> tuple[float, float]:
    """The loop a user writes: the family's diffusers pipelines (`config.model`, loaded with
    `from_pretrained` from the dirs the job loads), `batch_size` rows per call with a list of per-row
    generators (the seed rule), the family's defaults as the job resolved them (`config` after
    `resolve_family`), PNG encoding included. Returns (load s, generation s)."""
    import diffusers
    import torch

    from kandinsky_engine.models import resolve_source
    from kandinsky_engine.stages.movq import encode_image

    if LOOP_PIPELINES[config.model.family] is None:
        return stages_loop(config, rows, batch_size, threads)
    prior_class, decoder_class, decoder_reads_prompt = LOOP_PIPELINES[config.model.family]
    model, d = config.model, config.defaults
    torch.set_num_threads(threads)
    start = time.perf_counter()
    decoder = getattr(diffusers, decoder_class).from_pretrained(resolve_source(model.decoder, "decoder", model.cache_dir))
    prior = None
    if prior_class:
        prior = getattr(diffusers, prior_class).from_pretrained(resolve_source(model.prior, "prior", model.cache_dir))
    for pipe in (prior, decoder):
        if pipe is not None:
            pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = [r["prompt"] for r in chunk]
        generators = lambda: [torch.Generator().manual_seed(r["seed"]) for r in chunk]  # noqa: E731
        kwargs = {"prompt": prompts} if decoder_reads_prompt else {}
        if prior is not None:  # 2.x: the prior's image embeddings (and the empty prompt's) condition the decoder
            emb = prior(prompts, num_inference_steps=d.prior_num_inference_steps,
                        guidance_scale=d.prior_guidance_scale, generator=generators())
            kwargs.update(image_embeds=emb.image_embeds, negative_image_embeds=emb.negative_image_embeds)
        images = decoder(**kwargs, height=d.height, width=d.width, num_inference_steps=d.num_inference_steps,
                         guidance_scale=d.guidance_scale, generator=generators(), output_type="np").images
        for image in images:  # (H, W, 3) floats in [0, 1]
            encode_image((image * 255).round().astype("uint8"), "png", 95)
    return loaded - start, time.perf_counter() - loaded


def stages_loop(config, rows: list[dict], batch_size: int, threads: int) -> tuple[float, float]:
    """The loop for a family without a diffusers pipeline (Kandinsky 2.0): its stage classes called in order on
    `batch_size` rows at a time, without Ray, PNG encoding included. Returns (load s, generation s)."""
    import torch

    from kandinsky_engine.columns import passthrough_fields
    from kandinsky_engine.families import family_for
    from kandinsky_engine.rows import numpy_batch
    from kandinsky_engine.pipelines.prepare import prepare_unit

    start = time.perf_counter()
    stages = [cls(config, **kwargs) for _, cls, kwargs in family_for(config).stages(config, {"text2img"})]
    torch.set_num_threads(threads)  # each stage set its section's count
    loaded = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        table = pa.Table.from_pylist(rows[i : i + batch_size])
        n = table.num_rows
        for name, value in (("_unit", "bench/0"), ("_attempt", 1), ("_digest", "0" * 16), ("_unit_rows", n)):
            table = table.append_column(name, pa.array([value] * n))
        batch = numpy_batch(prepare_unit(table, row_errors={}, defaults=config.defaults,
                                         passthrough=passthrough_fields(table.schema)))
        for stage in stages:
            batch = stage(batch)
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
    from kandinsky_engine.jobs.run import connect, run_job
    from kandinsky_engine.config import JobConfig, apply_overrides
    from kandinsky_engine.families import resolve_family
    from kandinsky_engine.families.tiny import ensure_tiny_model

    if args.family != "kandinsky22" and args.tasks:
        raise ValueError(f"bench --tasks runs the other tasks on Kandinsky 2.2's tiny decoders; not with --family {args.family}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kandinsky-bench-"))
    cache = work / "cache"
    ensure_tiny_model(cache)
    rows = [{"id": f"bench-{i:05d}", "prompt": PROMPTS[i % len(PROMPTS)], "seed": i} for i in range(args.rows)]
    pq.write_table(pa.Table.from_pylist(rows), work / "manifest.parquet")
    data = {
        "input": {"manifest": str(work / "manifest.parquet")},
        "output": {"path": str(work / "out")},
        "model": {"cache_dir": str(cache), **TINY_MODEL[args.family]},
        "defaults": {"width": args.size, "height": args.size, "num_inference_steps": args.steps,
                     "prior_num_inference_steps": args.prior_steps or args.steps},
    }
    # The family's defaults (Kandinsky 3's guidance 3.0, 2.1's DDIM) filled in, as the job sees them.
    config, family = resolve_family(JobConfig.model_validate(apply_overrides(data, args.set or [])))

    threads = args.threads or os.cpu_count() or 1
    # The 1-minute load average when each side starts and at the end: on a shared machine the two
    # sides, timed one after the other, may see different contention.
    load = {"ray_job_start": os.getloadavg()[0]}
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

    load["loop_start"] = os.getloadavg()[0]
    load_s, loop_s = diffusers_loop(config, rows, args.loop_batch, threads)
    load["loop_end"] = os.getloadavg()[0]
    load1_s, loop1_s = diffusers_loop(config, rows, 1, threads) if args.batch1 else (None, None)
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
        "family": family.name,
        "rows": args.rows,
        "size": f"{args.size}x{args.size}",
        "steps": args.steps,
        "prior_steps": args.prior_steps or args.steps,
        "rows_per_unit": config.rows_per_block(),
        "stages": {s: getattr(config, s).model_dump(include={"batch_size", "actors", "num_cpus", "torch_threads"})
                   for s, _, _ in family.stages(config, {"text2img"})},
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
        "load_average_1m": {k: round(v, 2) for k, v in load.items()},
        "diffusers_load_s": round(load_s, 2),
        "diffusers_batch1_images_per_s": round(args.rows / loop1_s, 3) if loop1_s else None,
        "ratio_end_to_end": round((summary["rows"] / job_s) / loop_rate, 3),
        "ratio_excluding_startup": round((rows_after_first / steady_s) / loop_rate, 3),
        "ratio_vs_batch1_loop": round((summary["rows"] / job_s) / (args.rows / loop1_s), 3) if loop1_s else None,
        "per_task_ray_job": per_task,
    }
