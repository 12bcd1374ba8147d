"""Benchmark: the Ray job vs the loop a user would write (the family's diffusers pipelines, batched,
a list of per-row generators), same tiny model, same rows. `--family` picks Kandinsky 2.2
(default), 2.1 or 3: text2img rows on that family's tiny model on both sides.

Both sides produce encoded PNGs for N rows with the seed rule, at the same process and thread
budget: the loop runs in as many processes as the job has model actors, each with an actor's torch
threads and its share of the rows, all at once (a loop per core for the CPU layout). Two ratios:
- like for like: the job's steady rate (rows committed between the commits of the first and the
  third quarter of its units, over the time between them, from each unit's shard time: neither the
  fill nor the drain, and no unit counted that was computed before the window) over the loops'
  rate (rows over the slowest loop's generation time, its model loading excluded);
- end to end: rows over the job's whole time with Ray's start-up, over rows over the loops' whole
  time from starting their processes (imports and model loading included).
The breakdown comes from the job's own timeline and Ray Data's per-operator stats. `--threads N`
also times one loop process with N threads (the loop a user writes on this machine).
"""

from __future__ import annotations

import multiprocessing
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


def diffusers_loop(config, rows: list[dict], batch_size: int, threads: int) -> tuple[float, float, float]:
    """The loop a user writes: the family's diffusers pipelines (`config.model`, loaded with
    `from_pretrained` from the dirs the job loads), `batch_size` rows per call with a list of per-row
    generators (the seed rule), the family's defaults as the job resolved them (`config` after
    `resolve_family`), PNG encoding included. Returns (load s, generation s, generation CPU s of the
    process, every thread)."""
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
    loaded, cpu = time.perf_counter(), time.process_time()
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
    return loaded - start, time.perf_counter() - loaded, time.process_time() - cpu


def stages_loop(config, rows: list[dict], batch_size: int, threads: int) -> tuple[float, float, float]:
    """The loop for a family without a diffusers pipeline (Kandinsky 2.0): its stage classes called in order on
    `batch_size` rows at a time, without Ray, PNG encoding included. Returns (load s, generation s, generation
    CPU s of the process)."""
    import torch

    from kandinsky_engine.families import family_for
    from kandinsky_engine.pipelines.prepare import prepared_batch

    start = time.perf_counter()
    stages = [cls(config, **kwargs) for _, cls, kwargs in family_for(config).stages(config, {"text2img"})]
    torch.set_num_threads(threads)  # each stage set its section's count
    loaded, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(rows), batch_size):
        batch = prepared_batch(rows[i : i + batch_size], config.defaults, unit="bench/0")
        for stage in stages:
            batch = stage(batch)
    return loaded - start, time.perf_counter() - loaded, time.process_time() - cpu


def operator_times(stats: str | None, kind: str = "wall") -> dict[str, float]:
    """Per operator, the total remote `kind` ("wall" or "cpu") time (s) from Ray Data's stats text."""
    import re

    times, name = {}, None
    for line in (stats or "").splitlines():
        header = re.match(r"Operator \d+ (.+?): \d+ tasks executed", line)
        if header:
            name = header.group(1)
        found = re.match(rf"\* Remote {kind} time: .* ([\d.]+)(ms|s|us) total", line)
        if name and found:
            times[name] = round(float(found.group(1)) / {"s": 1, "ms": 1e3, "us": 1e6}[found.group(2)], 3)
            name = None
    return times


def _loop_process(config_data: dict, rows: list[dict], batch_size: int, threads: int) -> tuple[float, float]:
    """One loop process (spawned: it imports and loads as an actor does)."""
    from kandinsky_engine.config import JobConfig

    return diffusers_loop(JobConfig.model_validate(config_data), rows, batch_size, threads)


def parallel_loops(config, rows: list[dict], batch_size: int, processes: int, threads: int) -> dict:
    """The loop in `processes` fresh processes at once, each with `threads` torch threads and a
    contiguous share of the rows (whole loop batches). Times: the wall time from starting the
    processes to the last one's end, and the slowest process's loading and generation."""
    per = -(-len(rows) // processes)
    per = -(-per // batch_size) * batch_size
    shares = [rows[i : i + per] for i in range(0, len(rows), per)]
    data = config.model_dump(mode="json")
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(len(shares)) as pool:
        times = pool.starmap(_loop_process, [(data, share, batch_size, threads) for share in shares])
    wall = time.perf_counter() - started
    generation = max(g for _, g, _ in times)
    return {"processes": len(shares), "threads": threads, "load_s": round(max(lo for lo, _, _ in times), 2),
            "generation_s": round(generation, 2), "wall_s": round(wall, 2),
            "images_per_s": round(len(rows) / generation, 3), "images_per_s_end_to_end": round(len(rows) / wall, 3),
            # CPU seconds per image, model loading excluded: what the load of a shared machine changes least
            "cpu_s_per_image": round(sum(c for _, _, c in times) / len(rows), 4)}


def steady_rate(out: str, shards: list[dict]) -> dict:
    """Rows per second between the commits of the first and the third quarter of the units (each
    unit's data shard is written when it commits: its modification time), with the window."""
    commits = sorted((os.path.getmtime(Path(out) / r["file"]), r["rows"]) for r in shards)
    if len(commits) < 4:
        return {"images_per_s": None, "window_units": len(commits)}
    a, b = len(commits) // 4, (3 * len(commits)) // 4
    rows = sum(r for _, r in commits[a + 1 : b + 1])
    seconds = commits[b][0] - commits[a][0]
    return {"images_per_s": round(rows / seconds, 3) if seconds > 0 else None, "window_units": b - a,
            "window_rows": rows, "window_s": round(seconds, 2)}


def job_budget(config, stages: list[str]):
    """(model actor processes, torch threads each, the config as it runs) of the job: its layout, or
    the layout the engine gives it on this cluster where it sets none (pipelines/auto_layout.py)."""
    import ray

    from kandinsky_engine.pipelines.auto_layout import is_unset, resolve

    if is_unset(config, stages):
        config = resolve(config, stages, ray.cluster_resources())
    if config.fuse_stages:
        return config.decoder.actors, config.decoder.threads(), config
    return (sum(getattr(config, s).actors for s in stages), max(getattr(config, s).threads() for s in stages),
            config)


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
    stages = [s for s, _, _ in family.stages(config, {"text2img"})]

    # The 1-minute load average when each side starts and at the end: on a shared machine the two
    # sides, timed one after the other, may see different contention.
    load = {"ray_job_start": os.getloadavg()[0]}
    ray_startup = connect(None)
    processes, threads, layout = job_budget(config, stages)
    started = time.perf_counter()
    summary = run_job(config, overwrite=True)
    job_s = time.perf_counter() - started
    timeline = summary["runs"][-1]["timeline_s"] or {}
    steady = steady_rate(config.output.path, summary["shards"])

    load["loop_start"] = os.getloadavg()[0]
    loops = parallel_loops(config, rows, args.loop_batch, processes, threads)
    load["loop_end"] = os.getloadavg()[0]
    one = None
    if args.threads:  # the loop a user writes: one process, N threads
        load_s, loop_s, _ = diffusers_loop(config, rows, args.loop_batch, args.threads)
        one = {"threads": args.threads, "load_s": round(load_s, 2), "generation_s": round(loop_s, 2),
               "images_per_s": round(args.rows / loop_s, 3)}
    loop1_s = diffusers_loop(config, rows, 1, threads)[1] if args.batch1 else None
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
        per_task[task] = {"rows": task_summary["rows"], "failed": task_summary["failed_rows"], "ray_job_s": round(seconds, 2),
                          "images_per_s": round(task_summary["rows"] / seconds, 3)}
    end_to_end = summary["rows"] / (ray_startup + job_s)
    # CPU seconds per image of the job's model actors and encoding tasks (actors load their models in their
    # constructors, outside these tasks), as the loops' excludes their loading.
    cpu = operator_times(summary.get("ray_data_stats"), "cpu")
    job_cpu = sum(v for name, v in cpu.items() if "Read" not in name) / summary["rows"]
    return {
        "family": family.name,
        "rows": args.rows,
        "size": f"{args.size}x{args.size}",
        "steps": args.steps,
        "prior_steps": args.prior_steps or args.steps,
        "rows_per_unit": config.rows_per_block(),
        "budget": {"processes": processes, "torch_threads": threads, "cpus": os.cpu_count()},
        "fuse_stages": layout.fuse_stages,
        "stages": {s: {**getattr(layout, s).model_dump(include={"batch_size", "actors", "num_cpus"}),
                       "torch_threads": getattr(layout, s).threads()} for s in stages},
        "ray_startup_s": round(ray_startup, 2),
        "ray_job_s": round(job_s, 2),
        "ray_job_images_per_s": round(summary["rows"] / job_s, 3),
        "ray_job_images_per_s_end_to_end": round(end_to_end, 3),  # with Ray's start-up
        "ray_job_steady": steady,
        "breakdown_s": {"ray_start": round(ray_startup, 2), "plan_and_validate": round(job_s - summary["wall_time_s"], 2),
                        "first_unit (actor start + fill)": round(timeline.get("fill", 0.0), 2),
                        "steady": timeline.get("steady"), "drain": timeline.get("drain"),
                        "operators_remote_wall": operator_times(summary.get("ray_data_stats")),
                        "operators_remote_cpu": cpu},
        "ray_job_cpu_s_per_image": round(job_cpu, 4),
        f"diffusers_batch{args.loop_batch}_loops": loops,
        "diffusers_one_process": one,
        "load_average_1m": {k: round(v, 2) for k, v in load.items()},
        "diffusers_batch1_images_per_s": round(args.rows / loop1_s, 3) if loop1_s else None,
        "ratio_like_for_like": (round(steady["images_per_s"] / loops["images_per_s"], 3)
                                if steady["images_per_s"] else None),
        "ratio_end_to_end": round(end_to_end / loops["images_per_s_end_to_end"], 3),
        "ratio_cpu_per_image": round(loops["cpu_s_per_image"] / job_cpu, 3) if job_cpu else None,
        "ratio_vs_batch1_loop": round((summary["rows"] / job_s) / (args.rows / loop1_s), 3) if loop1_s else None,
        "per_task_ray_job": per_task,
    }
