"""The layout a job gets when its config leaves the layout unset: the fastest the engine knows for
the cluster it runs on, applied once Ray is connected (jobs/run.py).

Unset means: `fuse_stages` not given, and no stage section the job uses sets `actors`, `num_cpus`,
`num_gpus`, `torch_threads`, `gpu_memory_fraction` or `max_tasks_in_flight` (batch sizes are not
layout). A config that sets any of them runs exactly as written.

- CPU (model.device cpu): every stage fused in one actor, one single-thread actor per CPU of the
  cluster (README, Benchmark: the layout measured fastest), each reserving (CPUs - 1) / CPUs, and no
  more actors than the cluster's memory holds (the stage memory model's weights and activations of
  one actor, with MEMORY_HEADROOM).
- GPU (model.device cuda): the stage cost model's layout (pipelines/placement.py, `plan`) on the
  cluster's GPUs, for every family: the full-size models' FLOPs and the memory model for the
  cluster's GPU type, which fuses the stages into one whole-GPU actor per GPU where they fit one GPU,
  else gives each stage whole GPUs; jobs that also run `encode` or `hint` fused where they fit.

Neither changes a row's bits: CPU actors keep the sections' thread count (1, as the fingerprint
records it; fused stages give the same bytes as pools at the same thread counts), and GPU results do
not depend on the layout.
"""

from __future__ import annotations

import logging

from kandinsky_engine import JobConfig

log = logging.getLogger("kandinsky_engine")

SCHEDULING = ("actors", "num_cpus", "num_gpus", "torch_threads", "gpu_memory_fraction", "max_tasks_in_flight")
MEMORY_HEADROOM = 0.8  # share of the cluster's memory the CPU actors may take together


def is_unset(config: JobConfig, stages: list[str]) -> bool:
    """Whether the config leaves the layout of these stages to the engine."""
    if "fuse_stages" in config.model_fields_set:
        return False
    return not any(set(SCHEDULING) & getattr(config, name).model_fields_set for name in stages)


def actor_memory(config: JobConfig, stages: list[str]) -> int:
    """Bytes one fused actor holds at its peak: every stage's weights, the largest call's activations."""
    from kandinsky_engine.families import family_for
    from kandinsky_engine.memory import ALLOCATOR, estimate_job, job_specs

    family = family_for(config).name
    needs = estimate_job(config, family, stages, job_specs(config, family))
    return sum(n.weights + n.held for n in needs.values()) + int(ALLOCATOR * max(n.activations for n in needs.values()))


def cpu_fields(config: JobConfig, stages: list[str], cluster: dict) -> dict:
    cpus = int(cluster.get("CPU", 0))
    actors = max(1, cpus)
    memory = cluster.get("memory")
    if memory:
        actors = max(1, min(actors, int(MEMORY_HEADROOM * memory // max(1, actor_memory(config, stages)))))
    return {"actors": actors, "num_cpus": max(0.01, int(100 * (cpus - 1) / actors) / 100), "torch_threads": 1}


def gpu_update(config: JobConfig, stages: list[str], cluster: dict) -> dict | None:
    """The config update of the GPU layout, or None where the model cannot place this job."""
    from kandinsky_engine.jobs.plan import DEFAULT_TFLOPS, flop_costs, placed_stages, with_memory_model
    from kandinsky_engine.pipelines.memory_fit import GPU_MEMORY, gpu_type

    gpus = int(cluster.get("GPU", 0))
    if gpus < 1:
        return None  # no GPU yet: check_resources says so
    kind = gpu_type(cluster)
    if set(stages) <= set(placed_stages(config)):  # text2img jobs: the stage cost model
        from kandinsky_engine.pipelines.placement import gpu_layout

        try:
            costs = flop_costs(config, DEFAULT_TFLOPS)
            if kind is not None:
                costs = with_memory_model(config, costs, kind)
            layout = gpu_layout(costs, gpus)
        except ValueError:  # a stage no GPU of this type holds, or too few GPUs: check_resources says which
            return None
        overrides = layout.overrides()
        return {"fuse_stages": overrides.pop("fuse_stages"),
                **{name: getattr(config, name).model_copy(update=fields) for name, fields in overrides.items()}}
    if kind is not None:  # extra stages (encode, hint): fused where one GPU holds them
        from kandinsky_engine.memory import CUDA_CONTEXT, GIB, WORKSPACE
        from kandinsky_engine.pipelines.placement import MEMORY_BUDGET

        if actor_memory(config, stages) + CUDA_CONTEXT + WORKSPACE > MEMORY_BUDGET * GPU_MEMORY[kind] * GIB:
            return None
    decoder = config.decoder.model_copy(update={"actors": gpus, "num_gpus": 1.0, "max_tasks_in_flight": 2})
    return {"fuse_stages": True, "decoder": decoder}


def auto_layout(config: JobConfig, manifest, cluster: dict | None = None) -> JobConfig:
    """`config` with the engine's layout for `cluster` (default: the connected Ray cluster's resources)
    where it sets none for the stages `manifest`'s tasks use."""
    from kandinsky_engine.pipelines.generate import model_stages

    stages = [name for name, _, _, _ in model_stages(config, manifest)]
    if not is_unset(config, stages):
        return config
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    return resolve(config, stages, cluster)


def resolve(config: JobConfig, stages: list[str], cluster: dict) -> JobConfig:
    """The layout for `cluster` of a config that sets none (auto_layout)."""
    if config.model.device.startswith("cuda"):
        update = gpu_update(config, stages, cluster)
        if update is None:
            return config
    else:
        fields = cpu_fields(config, stages, cluster)
        update = {"fuse_stages": True, "decoder": config.decoder.model_copy(update=fields)}
    resolved = config.model_copy(update=update)
    resolved._as_written = config._as_written or config
    d = resolved.decoder
    log.info("layout (the config sets none): %s, %d actor(s)%s", "fused stages" if resolved.fuse_stages else
             "a pool per stage", d.actors, f" of {d.threads()} torch thread(s)" if not d.num_gpus else " on whole GPUs")
    return resolved
