"""Does each stage's actor fit the GPU memory it may use? Checked by the driver before any actor
starts (pipelines/generate.py, check_resources) and by the tests on every shipped config.

An actor may use `memory_fraction(stage)` x its GPU's memory: its fractional `num_gpus`, or
`gpu_memory_fraction` (kandinsky_engine/device.py; torch enforces it as a hard cap). Its need is
the stage memory model's estimated peak (kandinsky_engine/memory.py): weights, activations at the
configured batch and size, the allocator's overhead and the CUDA context. The GPU comes from the
Ray cluster: every GPU node advertises `accelerator_type:<type>` (Ray reads the product name
through NVML), and GPU_MEMORY maps the type to its memory. An unknown type is not checked (a
warning says so); on a cluster with several types the smallest counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kandinsky_engine.memory import GIB, StageMemory

log = logging.getLogger("kandinsky_engine")

# GiB of memory that CUDA reports for each Ray accelerator type (nvidia-smi's total). Where Ray's
# name stands for several cards, the smallest: A100 is 40 or 80 GB, V100 16 or 32, H100 80 or 94.
GPU_MEMORY = {"T4": 15.0, "V100": 16.0, "A10": 22.49, "A10G": 22.49, "L4": 22.49, "L40": 44.99, "L40S": 44.99,
              "A100": 40.0, "H100": 79.65, "H200": 140.4, "B200": 179.1, "RTX-PRO-6000": 95.6}
# Shipped configs leave at least this share of each cap unused (tests/test_infra_memory.py): the
# estimate is a model, not a measurement.
MARGIN = 0.10
PREFIX = "accelerator_type:"


@dataclass(frozen=True)
class Fit:
    stage: str
    need: StageMemory
    cap: int  # bytes the actor may use on its GPU
    gpu: str

    @property
    def fits(self) -> bool:
        return self.need.peak <= self.cap

    def headroom(self) -> float:
        return 1 - self.need.peak / self.cap


def gpu_type(cluster: dict) -> str | None:
    """The GPU type of a Ray cluster's resources (ray.cluster_resources()): the smallest known one;
    None when there is no GPU type, or any type is not in GPU_MEMORY."""
    types = [key[len(PREFIX):] for key in cluster if key.startswith(PREFIX)]
    if not types or any(t not in GPU_MEMORY for t in types):
        return None
    return min(types, key=GPU_MEMORY.get)


def stage_fits(config, stages: list[str], gpu: str, specs: dict | None = None) -> list[Fit]:
    """The estimate and the cap of each stage's actor (the job's family resolved) on a `gpu` card.
    Fused stages are one actor under the decoder section: the weights of all, the largest call."""
    from kandinsky_engine.device import memory_fraction
    from kandinsky_engine.families import family_for
    from kandinsky_engine.memory import estimate_job

    family = family_for(config).name
    needs = estimate_job(config, family, stages, specs)
    total = int(GPU_MEMORY[gpu] * GIB)
    if config.fuse_stages:
        parts = list(needs.values())
        fused = StageMemory("fused", sum(p.weights for p in parts), max(p.activations for p in parts),
                            sum(p.held for p in parts))
        return [Fit("decoder (fused stages)", fused, int(memory_fraction(config.decoder) * total), gpu)]
    return [Fit(name, need, int(memory_fraction(getattr(config, name)) * total), gpu) for name, need in needs.items()]


def check_memory(config, stages: list[str], cluster: dict) -> list[Fit]:
    """Refuse, before any actor starts, a CUDA job whose stage actors would not fit their GPU memory:
    the error names each such stage, its estimated peak and its cap."""
    if not config.model.device.startswith("cuda") or not cluster.get("GPU"):
        return []
    gpu = gpu_type(cluster)
    if gpu is None:
        types = sorted(key[len(PREFIX):] for key in cluster if key.startswith(PREFIX)) or ["none advertised"]
        log.warning("GPU memory fit not checked: GPU type %s is not one of %s", ", ".join(types), sorted(GPU_MEMORY))
        return []
    from kandinsky_engine.families import family_for
    from kandinsky_engine.memory import job_specs

    fits = stage_fits(config, stages, gpu, job_specs(config, family_for(config).name))
    bad = [f for f in fits if not f.fits]
    if bad:
        lines = [f"{f.stage}: estimated peak {f.need.describe()} > cap {f.cap / GIB:.1f} GiB" for f in bad]
        raise ValueError(
            f"stage actors would run out of GPU memory on {gpu} ({GPU_MEMORY[gpu]:g} GiB): " + "; ".join(lines)
            + ". An actor may use num_gpus (or gpu_memory_fraction) x the GPU's memory: raise its share, lower its "
            "batch_size, or size the stages with `kandinsky-batch plan CONFIG --gpus N --from-flops --gpu-type "
            f"{gpu}`")
    for f in fits:
        log.info("GPU memory: %s needs %.1f of %.1f GiB on %s", f.stage, f.need.peak / GIB, f.cap / GIB, gpu)
    return fits
