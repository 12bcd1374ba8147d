"""`kandinsky-batch plan CONFIG --gpus N` (or `--cpus C`): stage sizes that keep the U-Net busy.

Every family: the stages placed are the family's text2img stages (`placed_stages`: Kandinsky 2.2's
and 2.1's prior, decoder, movq; Kandinsky 3's and 2.0's text_encoder, decoder, movq), with the
family's generation defaults where the job sets none. It measures each stage's rows/s on this
machine with the job's models, device, dtype, size, steps and batch sizes: the stage classes called
directly, without Ray (as jobs/bench_gpu.py does), on synthetic text2img rows, one warm-up call and
then the best of --repeats timed calls. Or, for a cluster you are not on, `--from-flops` estimates
the stage times from the FLOPs of the family's full-size models at the job's size and steps
(counted on the meta device: kandinsky_engine/flops.py) and --tflops per GPU; or `--from-measured
FILE` (Kandinsky 2.2) takes the stage times that the GPU benchmark measured on the real GPU
(jobs/bench_gpu.py writes them as `stage_costs`), scaled to the job's size and steps.
pipelines/placement.py turns the times into actors, GPU or CPU shares and blocks in flight per
actor; this prints them with the predicted images/s, and `--write FILE` writes `fuse_stages` and
the family's stage sections as YAML to merge into the job config (`--full`: the whole config).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kandinsky_engine.pipelines.placement import Layout, StageCost, cpu_layout, gpu_layout

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
    parser.add_argument("--from-flops", action="store_true", help="estimate the stage times from the FLOPs of "
                        "the family's full-size models instead of measuring (GPUs only)")
    parser.add_argument("--from-measured", metavar="FILE", help="take the stage times (and memory) that "
                        "`python -m kandinsky_engine.jobs.bench_gpu --output FILE` measured on the GPU, scaled to the job's size and "
                        "steps (GPUs only; Kandinsky 2.2, the family it measures)")
    parser.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS, help="with --from-flops: effective TFLOP/s "
                        f"of one GPU on these models (default {DEFAULT_TFLOPS:g}: the issue's 1.8 images/s target)")
    parser.add_argument("--gpu-type", metavar="TYPE", help="with --gpus: the GPUs' type as Ray names it (L40S, A10G, "
                        "L4, H100...): each stage's memory need comes from the stage memory model for that GPU, "
                        "and its share holds it (see pipelines/memory_fit.py, GPU_MEMORY)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls per stage, after one warm-up; the best counts")
    parser.add_argument("--write", metavar="FILE", help="write fuse_stages and the planned stage sections (YAML) to "
                        "FILE: prior, decoder, movq (Kandinsky 2.2, 2.1) or text_encoder, decoder, movq (3, 2.0)")
    parser.add_argument("--full", action="store_true", help="with --write: the whole job config (CONFIG with --set "
                        "and the plan merged in; relative paths stay relative to where CONFIG was)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")


def placed_stages(config: JobConfig) -> list[str]:
    """The config sections of the stages a plan places: the family's text2img stages, in order."""
    from kandinsky_engine.families import family_for

    return [name for name, _, _ in family_for(config).stages(config, {"text2img"})]


def flop_costs(config: JobConfig, tflops: float) -> dict[str, StageCost]:
    """Seconds per row of each placed stage on one GPU sustaining `tflops`: the FLOPs of the family's
    released models at the job's defaults (size, steps, guidance), counted on the meta device
    (kandinsky_engine/flops.py). For Kandinsky 2.2 at 768x768, 50 + 25 steps with guidance: 212.6
    TFLOP per image, its reference file's figure."""
    from kandinsky_engine.families import family_for
    from kandinsky_engine.flops import stage_gflop

    stages = placed_stages(config)
    gflop = stage_gflop(config, family_for(config).name, stages)
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
    from kandinsky_engine.families import family_for

    family = family_for(config)
    if family.name != "kandinsky22":  # bench_gpu.py runs Kandinsky 2.2's stages; another family's are other models
        raise ValueError(f"--from-measured {path}: jobs/bench_gpu.py measures Kandinsky 2.2's stages, and this is a "
                         f"{family.title} job: plan it with --from-flops (and --gpu-type), or measure its own stages "
                         "with `kandinsky-batch plan CONFIG --gpus N` on a GPU machine (model.device cuda)")
    data = json.loads(Path(path).read_text())
    if "stage_costs" not in data:
        raise ValueError(f"--from-measured {path}: no `stage_costs` in it; write it with "
                         "`python -m kandinsky_engine.jobs.bench_gpu --output FILE` on the GPU (scripts/gpu_check.sh does)")
    s = data["settings"]
    factor = scale(config, s["size"], s["decoder_steps"], s["prior_steps"], s["guidance"])
    costs = {}
    for name in placed_stages(config):
        measured, batch = data["stage_costs"][name], getattr(config, name).batch_size
        memory = measured.get("memory_share") if measured["batch_size"] == batch else None
        costs[name] = StageCost(seconds_per_row=measured["seconds_per_row"] * factor[name], batch_size=batch,
                                memory=memory)
    return costs, (f"measured on {data.get('device', 'a GPU')} ({data.get('stage_costs_mode', 'eager')}) by "
                   f"jobs/bench_gpu.py at {s['size']}x{s['size']}, {s['decoder_steps']} + {s['prior_steps']} steps, "
                   f"scaled to this job ({path})")


def synthetic_rows(config: JobConfig, n: int) -> dict:
    """n text2img rows at the job's defaults, as the family's first stage receives them."""
    from kandinsky_engine.jobs.bench_gpu import PROMPTS
    from kandinsky_engine.pipelines.prepare import prepared_batch

    rows = [{"id": f"plan-{i:05d}", "prompt": PROMPTS[i % len(PROMPTS)], "seed": i} for i in range(n)]
    return prepared_batch(rows, config.defaults, unit="plan/0")


def measured_costs(config: JobConfig, repeats: int) -> dict[str, StageCost]:
    """Each stage's seconds per row at its batch size on this machine (GPU: its peak memory too).

    On CUDA every stage is measured with the whole GPU (num_gpus 1: no memory cap), one after the
    other, so that its peak is its own: weights and activations, as a share of the GPU's memory."""
    import torch

    from kandinsky_engine.families import family_for
    from kandinsky_engine.jobs.bench_gpu import copy, sync
    from kandinsky_engine.memory import CUDA_CONTEXT

    cuda = config.model.device.startswith("cuda")
    whole = {"num_gpus": 1.0, "gpu_memory_fraction": None} if cuda else {}
    stages = placed_stages(config)
    config = config.model_copy(update={"tasks": ["text2img"],  # the prior frees its image encoder, as text2img jobs do
                                       **{name: getattr(config, name).model_copy(update=whole) for name in stages}})
    device = torch.device(config.model.device)
    classes = {name: (cls, kwargs) for name, cls, kwargs in family_for(config).stages(config, {"text2img"})}
    sizes = {name: getattr(config, name).batch_size for name in stages}
    # Each stage's input at each later stage's batch size, computed by the stages before it.
    inputs = {name: synthetic_rows(config, sizes[name]) for name in stages}
    costs = {}
    for k, name in enumerate(stages):
        if cuda:
            base = torch.cuda.memory_reserved(device)
            torch.cuda.reset_peak_memory_stats(device)
        cls, kwargs = classes[name]
        stage = cls(config, **kwargs)
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
        for later in stages[k + 1:]:
            inputs[later] = stage(inputs[later])
        del stage
        if cuda:
            torch.cuda.empty_cache()
    return costs


def plan(config: JobConfig, gpus: int | None = None, cpus: int | None = None, from_flops: bool = False,
         tflops: float = DEFAULT_TFLOPS, repeats: int = 3, gpu_type: str | None = None,
         from_measured: str | None = None) -> tuple[dict[str, StageCost], Layout, str]:
    """(stage costs, layout, where the costs come from) for `gpus` GPUs or `cpus` cores."""
    from kandinsky_engine.families import resolve_family

    if config.model.device == "auto":  # 'auto' follows what is planned: GPUs -> cuda, CPU cores -> cpu
        config = config.model_copy(update={"model": config.model.model_copy(
            update={"device": "cuda" if gpus is not None else "cpu"})})
    # The family's stages and its defaults (Kandinsky 3's 1024x1024, 25 steps...) where the job sets none;
    # device and dtype resolved as the actors resolve them.
    config, _ = resolve_family(config)
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
        costs, source = flop_costs(config, tflops), f"the full-size models' FLOPs at {tflops:g} TFLOP/s per GPU"
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
    (kandinsky_engine/memory.py), as a share of its memory. A stage that a whole GPU of that type
    cannot hold is refused, by name: no layout places it."""
    from dataclasses import replace

    from kandinsky_engine.families import family_for
    from kandinsky_engine.memory import GIB, estimate_job
    from kandinsky_engine.pipelines.memory_fit import GPU_MEMORY
    from kandinsky_engine.pipelines.placement import MEMORY_BUDGET

    if gpu_type not in GPU_MEMORY:
        raise ValueError(f"--gpu-type {gpu_type!r}: not one of {sorted(GPU_MEMORY)}")
    needs = estimate_job(config, family_for(config).name, list(costs))  # the released architectures
    budget = MEMORY_BUDGET * GPU_MEMORY[gpu_type] * GIB
    if too_big := [f"{name} needs {need.describe()}" for name, need in needs.items() if need.peak > budget]:
        raise ValueError(f"no layout fits one {gpu_type} ({GPU_MEMORY[gpu_type]:g} GiB; an actor may use "
                         f"{MEMORY_BUDGET:.0%} of a whole GPU, {budget / GIB:.1f} GiB): " + "; ".join(too_big)
                         + ". Lower its batch_size, or plan a GPU type with more memory")
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
    width = max(8, *map(len, layout.stages))  # text_encoder is 12
    lines = [f"stage placement on {layout.devices} {unit}{'s' * (layout.devices > 1)}: {layout.rule}",
             f"stage times: {source}", "",
             f"{'stage':<{width}} {'s/row':>8} {'actors':>6} {'num_gpus':>8} {'num_cpus':>8} {'threads':>7} "
             f"{'mem_cap':>7} {'batch':>5} {'in_flight':>9} {'rows/s':>9}"]
    show = lambda v, fmt="": "-" if v is None else format(v, fmt)
    for name, s in layout.stages.items():
        lines.append(f"{name:<{width}} {costs[name].seconds_per_row:>8.4f} {s.actors:>6} {s.num_gpus:>8.2f} "
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
            data = {"fuse_stages": data["fuse_stages"], **{name: data[name] for name in layout.stages}}
        header = (f"# kandinsky-batch plan: {layout.devices} {layout.kind.upper()}(s), {layout.rule}; "
                  f"predicted {layout.images_per_s:.3f} images/s ({source})\n")
        if not args.full:
            header += "# Merge these keys into the job config (they replace the same keys).\n"
        Path(args.write).write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return 0
