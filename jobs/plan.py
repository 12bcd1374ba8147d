"""`kandinsky-batch plan CONFIG --gpus N` (or `--cpus C`): stage sizes that keep the U-Net busy.

It measures each model stage's rows/s on this machine with the job's models, device, dtype, size,
steps and batch sizes: the stage classes called directly, without Ray (as jobs/bench_gpu.py does),
on synthetic text2img rows, one warm-up call and then the best of --repeats timed calls. Or, for a
cluster you are not on, `--from-flops` estimates the stage times from the reference FLOPs of the
full-size models (kandinsky_engine/families/kandinsky22/reference/kandinsky22_configs.json) at the job's size and steps
and --tflops per GPU; or `--from-measured FILE` takes the stage times that the GPU benchmark measured
on the real GPU (jobs/bench_gpu.py writes them as `stage_costs`), scaled to the job's size and steps.
pipelines/placement.py turns the times into actors, GPU or CPU shares and blocks in flight per
actor; this prints them with the predicted images/s, and `--write FILE` writes `fuse_stages` and
the stage sections as YAML to merge into the job config (`--full`: the whole config).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kandinsky_engine.device import resolve_auto
from kandinsky_engine.pipelines.placement import STAGES, Layout, StageCost, cpu_layout, gpu_layout

if TYPE_CHECKING:  # the CLI builds its parser from add_arguments: this module stays light to import
    from kandinsky_engine.config import JobConfig

# --from-flops: the effective rate of one GPU on these models. 1.8 images/s x 212.6 TFLOP per
# 768x768 image (50 + 25 steps, guidance on both) is the issue's target on an H100/H200-class GPU.
DEFAULT_TFLOPS = 380.0


def add_arguments(parser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--gpus", type=int, metavar="N", help="plan for N GPUs (times measured on this GPU: "
                       "model.device cuda; or --from-flops)")
    where.add_argument("--cpus", type=int, metavar="C", help="plan for C CPU cores (times measured on this CPU)")
    parser.add_argument("--from-flops", action="store_true", help="estimate the stage times from the reference "
                        "FLOPs of the full-size models instead of measuring (GPUs only)")
    parser.add_argument("--from-measured", metavar="FILE", help="take the stage times (and memory) that "
                        "`python -m kandinsky_engine.jobs.bench_gpu --output FILE` measured on the GPU, scaled to the job's size and "
                        "steps (GPUs only)")
    parser.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS, help="with --from-flops: effective TFLOP/s "
                        f"of one GPU on these models (default {DEFAULT_TFLOPS:g}: the issue's 1.8 images/s target)")
    parser.add_argument("--gpu-type", metavar="TYPE", help="with --gpus: the GPUs' type as Ray names it (L40S, A10G, "
                        "L4, H100...): each stage's memory need comes from the stage memory model for that GPU, "
                        "and its share holds it (see pipelines/memory_fit.py, GPU_MEMORY)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls per stage, after one warm-up; the best counts")
    parser.add_argument("--write", metavar="FILE", help="write the prior, decoder and movq sections (YAML) to FILE")
    parser.add_argument("--full", action="store_true", help="with --write: the whole job config (CONFIG with --set "
                        "and the plan merged in; relative paths stay relative to where CONFIG was)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")


def flop_costs(config: JobConfig, tflops: float) -> dict[str, StageCost]:
    """Seconds per row of each stage on one GPU sustaining `tflops`, from the reference FLOPs at
    768x768, scaled to the job's defaults: U-Net and MoVQ by pixels at the working size (the next
    multiple of 64; their convolutions are linear in it, attention a little worse), U-Net and prior
    by steps, and x2 where guidance runs the unconditional half. The prior's text encoding counts
    twice, as in the reference's 212.6 TFLOP per image."""
    from kandinsky_engine.families.kandinsky22.fullsize import configs

    ref, d = configs()["_flops_768"], config.defaults
    pixels = (64 * math.ceil(d.width / 64)) * (64 * math.ceil(d.height / 64)) / 768**2
    cfg, prior_cfg = (2 if scale > 1 else 1 for scale in (d.guidance_scale, d.prior_guidance_scale))
    gflop = {"prior": prior_cfg * (ref["prior_forward_gflop"] * d.prior_num_inference_steps + ref["clip_text_gflop"]),
             "decoder": cfg * ref["unet_forward_per_sample_gflop"] * d.num_inference_steps * pixels,
             "movq": ref["movq_decode_per_image_gflop"] * pixels}
    return {name: StageCost(seconds_per_row=g * 1e9 / (tflops * 1e12), batch_size=getattr(config, name).batch_size)
            for name, g in gflop.items()}


def scale(config: JobConfig, size: int, decoder_steps: int, prior_steps: int, guidance: float) -> dict[str, float]:
    """Per stage, the factor from a measurement's settings to the job's defaults: U-Net and MoVQ by
    pixels at the working size (the next multiple of 64), U-Net and prior by steps, and by 2 where
    guidance on one side runs the unconditional half and not on the other."""
    d = config.defaults
    pixels = (64 * math.ceil(d.width / 64)) * (64 * math.ceil(d.height / 64)) / (64 * math.ceil(size / 64)) ** 2
    cfg = lambda job, measured: (2 if job > 1 else 1) / (2 if measured > 1 else 1)  # noqa: E731
    return {"prior": d.prior_num_inference_steps / prior_steps * cfg(d.prior_guidance_scale, guidance),
            "decoder": d.num_inference_steps / decoder_steps * pixels * cfg(d.guidance_scale, guidance),
            "movq": pixels}


def file_costs(config: JobConfig, path: str) -> tuple[dict[str, StageCost], str]:
    """The stage costs that jobs/bench_gpu.py measured (its JSON: `stage_costs`, `settings`, `device`),
    scaled to the job's size and steps (`scale`); the measured memory shares where the batch sizes are
    the job's (else none: the memory model or equal caps then apply)."""
    data = json.loads(Path(path).read_text())
    if "stage_costs" not in data:
        raise ValueError(f"--from-measured {path}: no `stage_costs` in it; write it with "
                         "`python -m kandinsky_engine.jobs.bench_gpu --output FILE` on the GPU (scripts/gpu_check.sh does)")
    s = data["settings"]
    factor = scale(config, s["size"], s["decoder_steps"], s["prior_steps"], s["guidance"])
    costs = {}
    for name in STAGES:
        measured, batch = data["stage_costs"][name], getattr(config, name).batch_size
        memory = measured.get("memory_share") if measured["batch_size"] == batch else None
        costs[name] = StageCost(seconds_per_row=measured["seconds_per_row"] * factor[name], batch_size=batch,
                                memory=memory)
    return costs, (f"measured on {data.get('device', 'a GPU')} ({data.get('stage_costs_mode', 'eager')}) by "
                   f"jobs/bench_gpu.py at {s['size']}x{s['size']}, {s['decoder_steps']} + {s['prior_steps']} steps, "
                   f"scaled to this job ({path})")


def synthetic_rows(config: JobConfig, n: int) -> dict:
    """n text2img rows at the job's defaults, as the prior stage receives them."""
    import numpy as np

    from kandinsky_engine.jobs.bench_gpu import bench_batch

    d = config.defaults
    batch = bench_batch(n, d.width, d.num_inference_steps, d.prior_num_inference_steps)
    batch.update(height=np.full(n, d.height), guidance_scale=np.full(n, d.guidance_scale),
                 prior_guidance_scale=np.full(n, d.prior_guidance_scale))
    return batch


def measured_costs(config: JobConfig, repeats: int) -> dict[str, StageCost]:
    """Each stage's seconds per row at its batch size on this machine (GPU: its peak memory too).

    On CUDA every stage is measured with the whole GPU (num_gpus 1: no memory cap), one after the
    other, so that its peak is its own: weights and activations, as a share of the GPU's memory."""
    import torch

    from kandinsky_engine.jobs.bench_gpu import copy, sync
    from kandinsky_engine import DecoderStage, MovqStage, PriorStage
    from kandinsky_engine.memory import CUDA_CONTEXT

    cuda = config.model.device.startswith("cuda")
    whole = {"num_gpus": 1.0, "gpu_memory_fraction": None} if cuda else {}
    config = config.model_copy(update={"tasks": ["text2img"],  # the prior frees its image encoder, as text2img jobs do
                                       **{name: getattr(config, name).model_copy(update=whole) for name in STAGES}})
    device = torch.device(config.model.device)
    classes = {"prior": PriorStage, "decoder": DecoderStage, "movq": MovqStage}
    sizes = {name: getattr(config, name).batch_size for name in STAGES}
    # Each stage's input at each later stage's batch size, computed by the stages before it.
    inputs = {name: synthetic_rows(config, sizes[name]) for name in STAGES}
    costs = {}
    for k, name in enumerate(STAGES):
        if cuda:
            base = torch.cuda.memory_reserved(device)
            torch.cuda.reset_peak_memory_stats(device)
        stage = classes[name](config)
        stage(copy(inputs[name]))  # warm-up: lazy inits, cuDNN/cuBLAS heuristics, the allocator
        best = math.inf
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            stage(copy(inputs[name]))
            sync(device)
            best = min(best, time.perf_counter() - start)
        memory = None
        if cuda:
            total = torch.cuda.get_device_properties(device).total_memory
            # + the CUDA context, outside torch's allocator but in the GPU's memory (kandinsky_engine/memory.py)
            memory = (torch.cuda.max_memory_reserved(device) - base + CUDA_CONTEXT) / total
        costs[name] = StageCost(seconds_per_row=best / sizes[name], batch_size=sizes[name],
                                threads=getattr(config, name).threads(), memory=memory)
        for later in STAGES[k + 1:]:
            inputs[later] = stage(inputs[later])
        del stage
        if cuda:
            torch.cuda.empty_cache()
    return costs


def plan(config: JobConfig, gpus: int | None = None, cpus: int | None = None, from_flops: bool = False,
         tflops: float = DEFAULT_TFLOPS, repeats: int = 3, gpu_type: str | None = None,
         from_measured: str | None = None) -> tuple[dict[str, StageCost], Layout, str]:
    """(stage costs, layout, where the costs come from) for `gpus` GPUs or `cpus` cores."""
    from kandinsky_engine.families import family_for

    family = family_for(config)
    if family.name != "kandinsky22":  # its stage costs and FLOPs are Kandinsky 2.2's prior, U-Net and MoVQ
        raise ValueError(f"plan places Kandinsky 2.2's stages; model.decoder is a {family.title} model, which it "
                         "does not place yet: size its sections by hand (docs/models.md gives each stage's "
                         "GPU memory)")
    if config.model.device == "auto":  # 'auto' follows what is planned: GPUs -> cuda, CPU cores -> cpu
        config = config.model_copy(update={"model": config.model.model_copy(
            update={"device": "cuda" if gpus is not None else "cpu"})})
    config = resolve_auto(config)
    cuda = config.model.device.startswith("cuda")
    if (gpus is not None and gpus < 1) or (cpus is not None and cpus < 2):  # before minutes of measuring
        raise ValueError(f"plan for at least 1 GPU or 2 CPU cores (one stays free for reading), got "
                         f"{'--gpus ' + str(gpus) if gpus is not None else '--cpus ' + str(cpus)}")
    if gpus is not None and not cuda:
        raise ValueError(f"--gpus plans a GPU job, but model.device is {config.model.device!r}: set model.device=cuda "
                         "(measured: on a GPU machine; --from-flops: anywhere), or plan CPU cores with --cpus C")
    if from_flops and from_measured:
        raise ValueError("--from-flops and --from-measured are two sources of stage times: pick one")
    if (from_flops or from_measured) and cpus is not None:
        raise ValueError(f"{'--from-flops' if from_flops else '--from-measured'} gives GPU times: use it with --gpus")
    if from_measured:
        costs, source = file_costs(config, from_measured)
    elif from_flops:
        costs, source = flop_costs(config, tflops), f"reference FLOPs at {tflops:g} TFLOP/s per GPU"
    else:
        if cpus is not None and cuda:
            raise ValueError("--cpus plans from times measured on the CPU, but model.device is cuda: use --gpus")
        if repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {repeats}")
        costs, source = measured_costs(config, repeats), f"measured on this machine ({config.model.device})"
    if gpu_type is not None:
        if gpus is None:
            raise ValueError("--gpu-type sizes GPU memory: use it with --gpus")
        costs, source = with_memory_model(config, costs, gpu_type), f"{source}; memory: the stage memory model on {gpu_type}"
    layout = gpu_layout(costs, gpus) if gpus is not None else cpu_layout(costs, cpus)
    return costs, layout, source


def with_memory_model(config: JobConfig, costs: dict[str, StageCost], gpu_type: str) -> dict[str, StageCost]:
    """`costs` with each stage's memory need estimated by the stage memory model on a `gpu_type` GPU
    (kandinsky_engine/memory.py), as a share of its memory."""
    from dataclasses import replace

    from kandinsky_engine.families import family_for
    from kandinsky_engine.memory import GIB, estimate_job
    from kandinsky_engine.pipelines.memory_fit import GPU_MEMORY

    if gpu_type not in GPU_MEMORY:
        raise ValueError(f"--gpu-type {gpu_type!r}: not one of {sorted(GPU_MEMORY)}")
    needs = estimate_job(config, family_for(config).name, list(costs))
    return {name: replace(cost, memory=needs[name].peak / (GPU_MEMORY[gpu_type] * GIB)) for name, cost in costs.items()}


def set_arguments(layout: Layout) -> list[str]:
    """The layout as `--set` overrides, e.g. fuse_stages=true, decoder.actors=7 (null: the default applies)."""
    out = []
    for name, fields in layout.overrides().items():
        if isinstance(fields, dict):
            out += [f"{name}.{key}={json.dumps(value)}" for key, value in fields.items()]
        else:
            out.append(f"{name}={json.dumps(fields)}")
    return out


def merged_config(path: str, sets: list[str], layout: Layout) -> dict:
    """CONFIG's YAML with --set and then the layout applied, validated as a JobConfig."""
    import yaml

    from kandinsky_engine.config import JobConfig, apply_overrides

    data = yaml.safe_load(Path(path).read_text()) or {}
    data = apply_overrides(apply_overrides(data, list(sets)), set_arguments(layout))
    JobConfig.model_validate(data)
    return data


def table(costs: dict[str, StageCost], layout: Layout, source: str) -> str:
    unit = "GPU" if layout.kind == "gpu" else "CPU core"
    lines = [f"stage placement on {layout.devices} {unit}{'s' * (layout.devices > 1)}: {layout.rule}",
             f"stage times: {source}", "",
             f"{'stage':<8} {'s/row':>8} {'actors':>6} {'num_gpus':>8} {'num_cpus':>8} {'threads':>7} "
             f"{'mem_cap':>7} {'batch':>5} {'in_flight':>9} {'rows/s':>9}"]
    show = lambda v, fmt="": "-" if v is None else format(v, fmt)
    for name, s in layout.stages.items():
        lines.append(f"{name:<8} {costs[name].seconds_per_row:>8.4f} {s.actors:>6} {s.num_gpus:>8.2f} "
                     f"{show(s.num_cpus, '.2f'):>8} {show(s.torch_threads):>7} {show(s.gpu_memory_fraction, '.2f'):>7} "
                     f"{s.batch_size:>5} {show(s.max_tasks_in_flight):>9} {s.rows_per_s:>9.3f}")
    lines += ["", f"predicted: {layout.images_per_s:.3f} images/s (ceiling {layout.ceiling:.3f} = {layout.devices} / "
                  f"the stages' summed s/row; {layout.images_per_s / layout.ceiling:.0%} of it)",
              "as --set: " + " ".join(f"--set {item}" for item in set_arguments(layout))]
    return "\n".join(lines)


def report(costs: dict[str, StageCost], layout: Layout, source: str) -> dict:
    return {"devices": layout.devices, "kind": layout.kind, "rule": layout.rule, "source": source,
            "fuse_stages": layout.fused,
            "seconds_per_row": {name: c.seconds_per_row for name, c in costs.items()},
            "memory_share": {name: c.memory for name, c in costs.items()},
            "images_per_s": round(layout.images_per_s, 4), "ceiling_images_per_s": round(layout.ceiling, 4),
            "stages": {name: {**s.overrides(), "rows_per_s": round(s.rows_per_s, 4)}
                       for name, s in layout.stages.items()}}


def run(args, config: JobConfig) -> int:
    import yaml

    costs, layout, source = plan(config, gpus=args.gpus, cpus=args.cpus, from_flops=args.from_flops,
                                 tflops=args.tflops, repeats=args.repeats, gpu_type=args.gpu_type,
                                 from_measured=args.from_measured)
    print(json.dumps(report(costs, layout, source), indent=2) if args.json else table(costs, layout, source))
    if args.write:
        data = merged_config(args.config, args.set or [], layout)
        if not args.full:
            data = {"fuse_stages": data["fuse_stages"], **{name: data[name] for name in STAGES}}
        header = (f"# kandinsky-batch plan: {layout.devices} {layout.kind.upper()}(s), {layout.rule}; "
                  f"predicted {layout.images_per_s:.3f} images/s ({source})\n")
        if not args.full:
            header += "# Merge these keys into the job config (they replace the same keys).\n"
        Path(args.write).write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return 0
