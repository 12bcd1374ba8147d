"""Stage placement: how many actors of each model stage, and what share of a GPU (or of the CPUs)
each reserves, so that the U-Net is never starved. Pure arithmetic, no Ray and no torch:
`kandinsky-batch plan` (jobs/plan.py) measures or estimates the stage times and prints what this
returns; a job that leaves its layout unset gets it from here too (pipelines/auto_layout.py).

The model, stated once: a stage needs t seconds of one whole device per row (at its batch size),
and actors that share a device share its time. N devices can never do better than N / Σt images/s
(the ceiling). The stages are a family's text2img stages, in order, keyed by their config sections:
Kandinsky 2.2's and 2.1's `prior`, `decoder`, `movq`; Kandinsky 3's and 2.0's `text_encoder`,
`decoder`, `movq` (the `decoder` is always the U-Net). The layouts:

- **fused** (`fuse_stages`): every stage in one actor, one actor per GPU (or per `threads` CPU
  cores). Each actor runs a block through every stage on its own device, so the devices
  run at the ceiling, whatever the stages' shares, and there is nothing to pack: the best layout
  wherever one device holds every stage's models (memory, when known). It is what the engine
  measured fastest on CPUs, too (README, Benchmark).
- **split** (several GPUs, where a GPU cannot hold every stage): each pool on whole GPUs, as many of
  each as balance the pools. Whole GPUs never strand a share: with fractional reservations Ray packs
  actors best-fit in the order the pools start, so two 0.36 MoVQ actors can take the GPU a 0.63
  prior needed, and that prior waits.
- **shared** (one GPU where the stages do not fit one actor): one actor of each stage, `num_gpus`
  shares in proportion to their times; on one GPU every packing fits.

Ray's fractional GPUs are reservations, not partitions. A compute share says nothing about memory
(the prior's 4% of the FLOPs is not 4% of the memory it needs): where each stage's memory need is
known (estimated by the stage memory model for a GPU type, `plan --gpu-type`, or measured), a
stage's share is at least its need over MEMORY_BUDGET, and its CUDA memory cap is its share; where
only measured peaks are known, the caps are set on their own (`gpu_memory_fraction`).

Only the text2img stages are placed: jobs with image inputs or ControlNet rows also run `encode` or
`hint`, which need a share taken from these (README, Real weights), or join the fused actor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Blocks Ray Data queues on each U-Net actor: at 2 the next block's inputs are fetched while the
# actor computes, so the GPU does not idle between blocks; more would only queue blocks behind a
# busy actor while another could take them. 2 is also Ray 2.60's default for actors that run one
# call at a time; the plan pins it so that a changed default (or RAY_DATA_ACTOR_DEFAULT_MAX_TASKS_
# IN_FLIGHT_TO_MAX_CONCURRENCY_FACTOR, DataContext.max_tasks_in_flight_per_actor) cannot undo it.
UNET_IN_FLIGHT = 2
# On several GPUs the U-Net gets whole GPUs when that reaches this share of the ceiling (see gpu_layout).
DEDICATED_MIN_EFFICIENCY = 0.9
# Stages sharing a GPU may together need at most this share of its memory (measured peaks): each
# process also holds a CUDA context outside torch's allocator, and the caps are hard limits.
MEMORY_BUDGET = 0.9


@dataclass(frozen=True)
class StageCost:
    """What one stage costs, measured or estimated."""

    seconds_per_row: float  # of one whole device: a GPU, or `threads` CPU cores
    batch_size: int  # rows per call, as measured
    threads: int = 1  # torch threads of the CPU measurement
    memory: float | None = None  # peak GPU memory as a share of the GPU (None: not measured)


@dataclass(frozen=True)
class StagePlacement:
    """One stage's actor pool, as StageConfig fields, and the rows/s it can serve."""

    actors: int
    batch_size: int
    rows_per_s: float
    num_gpus: float = 0.0
    num_cpus: float | None = None  # None: the job's own (GPU layouts)
    torch_threads: int | None = None
    gpu_memory_fraction: float | None = None
    max_tasks_in_flight: int | None = None

    def overrides(self) -> dict:
        """The StageConfig fields this placement sets (None where Ray's or the engine's default applies)."""
        out = {"actors": self.actors, "batch_size": self.batch_size, "num_gpus": self.num_gpus,
               "gpu_memory_fraction": self.gpu_memory_fraction, "max_tasks_in_flight": self.max_tasks_in_flight}
        if self.num_cpus is not None:
            out.update(num_cpus=self.num_cpus, torch_threads=self.torch_threads)
        return out


@dataclass(frozen=True)
class Layout:
    devices: int
    kind: str  # "gpu" or "cpu"
    rule: str  # how the stages were placed, in words
    stages: dict[str, StagePlacement]
    ceiling: float  # images/s if every device were busy all the time
    fused: bool = False  # every stage in the decoder section's actors (fuse_stages)

    @property
    def images_per_s(self) -> float:
        return min(min(s.rows_per_s for s in self.stages.values()), self.ceiling)

    def overrides(self) -> dict:
        """The config fields this layout sets: per stage section, and `fuse_stages`."""
        if self.fused:  # one pool, scheduled by the decoder section (as every stage runs in it); own batch sizes
            scheduling = self.stages["decoder"].overrides()
            return {"fuse_stages": True, **{name: {**scheduling, "batch_size": s.batch_size}
                                            for name, s in self.stages.items()}}
        return {"fuse_stages": False, **{name: stage.overrides() for name, stage in self.stages.items()}}


def hundredths(x: float, up: bool = False) -> float:
    """x rounded down (or up) to 0.01, at least 0.01; a tolerance keeps 0.3 from becoming 0.29."""
    n = math.ceil(x * 100 - 1e-6) if up else math.floor(x * 100 + 1e-6)
    return max(1, n) / 100


def gpu_shares(times: dict[str, float], fill: bool = False) -> dict[str, float]:
    """Fractions of one GPU proportional to `times`, in hundredths, summing to at most 1. With `fill`,
    the other stages are rounded up and the slowest gets what they leave, so that it alone sets the
    pace (rounding costs it the least, relative to its share)."""
    total = sum(times.values())
    if not fill:
        return {name: hundredths(t / total) for name, t in times.items()}
    keep = max(times, key=times.get)
    shares = {name: hundredths(t / total, up=True) for name, t in times.items() if name != keep}
    left = 1 - sum(shares.values())
    if left < 0.01 - 1e-9:
        raise ValueError(f"the stages besides {keep} take the whole GPU ({shares}); nothing is left for {keep}")
    return {**shares, keep: hundredths(left)}


def memory_shares(costs: dict[str, StageCost], times: dict[str, float], fill: str | None = None) -> dict[str, float]:
    """num_gpus of stages that share one GPU and whose memory needs are known (`StageCost.memory`):
    each at least its time share and its need / MEMORY_BUDGET (rounded up), so that each actor's
    cap (its num_gpus) holds its peak with headroom; `fill` gets what the others leave, which must
    hold its own need."""
    total = sum(times.values())
    floor = {name: hundredths(c.memory / MEMORY_BUDGET, up=True) for name, c in costs.items()}
    floor.update({name: max(floor[name], hundredths(times[name] / total, up=True)) for name in costs if name != fill})
    shares = dict(floor)
    if fill is not None:
        shares[fill] = hundredths(1 - sum(v for name, v in floor.items() if name != fill))
    if sum(shares.values()) > 1 + 1e-9 or shares.get(fill, 1) < floor.get(fill, 0) - 1e-9:
        detail = ", ".join(f"{name} {c.memory:.0%}" for name, c in costs.items())
        raise ValueError(f"{', '.join(costs)} cannot share one GPU: their memory needs ({detail} of it, estimated) "
                         f"over the {MEMORY_BUDGET:.0%} budget take more than the whole GPU; lower their batch sizes, "
                         "or give them GPUs of their own")
    return shares


def memory_caps(costs: dict[str, StageCost]) -> dict[str, float]:
    """CUDA memory caps of stages sharing one GPU: each measured peak scaled up by the same factor so
    that they fill the GPU (each keeps headroom in proportion to its need); equal shares when a peak
    was not measured (--from-flops)."""
    needs = {name: c.memory for name, c in costs.items()}
    if None in needs.values():
        return {name: hundredths(1 / len(needs)) for name in needs}
    total = sum(needs.values())
    if total > MEMORY_BUDGET:
        detail = ", ".join(f"{name} {need:.0%}" for name, need in needs.items())
        raise ValueError(f"{', '.join(needs)} need {total:.0%} of one GPU's memory together ({detail}, measured "
                         f"peaks), more than the {MEMORY_BUDGET:.0%} they may share: lower their batch sizes")
    return {name: hundredths(need / total) for name, need in needs.items()}


def shared_layout(costs: dict[str, StageCost], gpus: int) -> Layout:
    """Every GPU runs one actor of each stage, with GPU shares proportional to the stage times:
    the one-GPU layout, repeated. With the U-Net's share above 1/2, Ray puts one U-Net on each GPU."""
    times = {name: c.seconds_per_row for name, c in costs.items()}
    # Time shares give the rows/s; with known memory needs, Ray reserves the memory shares (see memory_shares).
    time_shares = shares = gpu_shares(times, fill=True)
    if all(c.memory is not None for c in costs.values()):
        shares, caps = memory_shares(costs, times, fill=max(times, key=times.get)), dict.fromkeys(costs)
    else:
        caps = memory_caps(costs)
    stages = {name: StagePlacement(actors=gpus, batch_size=c.batch_size, num_gpus=shares[name],
                                   rows_per_s=gpus * time_shares[name] / c.seconds_per_row, gpu_memory_fraction=caps[name],
                                   max_tasks_in_flight=UNET_IN_FLIGHT if name == "decoder" else None)
              for name, c in costs.items()}
    rule = "one GPU shared by all stages" if gpus == 1 else "every GPU shared by one actor of each stage"
    return Layout(gpus, "gpu", rule, stages, gpus / sum(times.values()))


def fused_layout(costs: dict[str, StageCost], devices: int, kind: str = "gpu") -> Layout | None:
    """Every stage in one actor: one per GPU, or one per `threads` CPU cores (the decoder's measured
    threads; Ray reservations scaled to devices - 1 CPUs). Each actor does Σt per row, so the devices
    run at the ceiling. None where the stages' known memory needs do not fit one GPU together."""
    total = sum(c.seconds_per_row * (c.threads if kind == "cpu" else 1) for c in costs.values())
    ceiling = devices / total
    if kind == "gpu":
        needs = [c.memory for c in costs.values()]
        if None not in needs and sum(needs) > MEMORY_BUDGET:
            return None
        actors, fields = devices, {"num_gpus": 1.0}
        rule = f"fused stages: one actor per GPU ({devices}), each running {', '.join(costs)}"
    else:
        threads = costs["decoder"].threads
        actors = max(1, devices // threads)
        fields = {"num_cpus": hundredths((devices - 1) / actors), "torch_threads": threads}
        rule = f"fused stages: {actors} actor(s) of {threads} torch thread(s) on {devices} cores"
    rows = actors / (total / (costs["decoder"].threads if kind == "cpu" else 1))
    stages = {name: StagePlacement(actors=actors, batch_size=c.batch_size, rows_per_s=rows,
                                   max_tasks_in_flight=UNET_IN_FLIGHT, **fields)
              for name, c in costs.items()}
    return Layout(devices, kind, rule, stages, ceiling, fused=True)


def compositions(total: int, parts: int):
    """Every way to write `total` as `parts` counts of at least 1, in order."""
    if parts == 1:
        yield (total,)
        return
    for first in range(1, total - parts + 2):
        for rest in compositions(total - first, parts - 1):
            yield (first, *rest)


def split_layout(costs: dict[str, StageCost], gpus: int) -> Layout:
    """Each pool on whole GPUs (a count per stage, summing to N): the counts that serve the most
    rows/s (the min over stages of count / t; more U-Nets on ties). No fractional reservation, so no
    packing can strand an actor."""
    if gpus < len(costs):
        raise ValueError(f"a split layout needs at least {len(costs)} GPUs (one per stage), got {gpus}")
    t = {name: c.seconds_per_row for name, c in costs.items()}
    names = list(costs)
    best = max(compositions(gpus, len(names)),
               key=lambda c: (min(n / t[name] for n, name in zip(c, names)), c[names.index("decoder")]))
    counts = dict(zip(names, best))
    stages = {name: StagePlacement(actors=counts[name], batch_size=costs[name].batch_size, num_gpus=1.0,
                                   rows_per_s=counts[name] / t[name],
                                   max_tasks_in_flight=UNET_IN_FLIGHT if name == "decoder" else None)
              for name in names}
    rule = "whole GPUs per stage: " + ", ".join(f"{'U-Net' if name == 'decoder' else name} {counts[name]}"
                                                 for name in names)
    return Layout(gpus, "gpu", rule, stages, gpus / sum(t.values()))


def gpu_layout(costs: dict[str, StageCost], gpus: int) -> Layout:
    """The placement on `gpus` GPUs (costs: per stage, on one whole GPU): fused where the stages fit
    one GPU (it runs at the ceiling N / Σt); else, on one GPU, shared by time; on two, every GPU shared
    as one (Ray may then pack two small actors where a U-Net should go: plan a fused layout with
    smaller batches instead); on three or more, whole GPUs per stage (split_layout)."""
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    fused = fused_layout(costs, gpus)
    if fused is not None:
        return fused
    return split_layout(costs, gpus) if gpus >= 3 else shared_layout(costs, gpus)


def cpu_layout(costs: dict[str, StageCost], cpus: int) -> Layout:
    """The placement on `cpus` CPU cores: fused, one actor per `threads` cores (fused_layout), which
    reaches the ceiling; `pooled_cpu_layout` is the pool-per-stage alternative."""
    if cpus < 2:
        raise ValueError(f"--cpus must be at least 2 (the actors may reserve at most cpus - 1), got {cpus}")
    return fused_layout(costs, cpus, kind="cpu")


def pooled_cpu_layout(costs: dict[str, StageCost], cpus: int) -> Layout:
    """A pool per stage on `cpus` CPU cores (costs: per stage, one actor with its `threads` threads).

    Starting from one actor per stage, the slowest pool gets another actor while the actors' threads
    fit the cores; images/s is then capped by the cores' total work (cpus / Σ threads·t). Ray
    reservations follow the threads, scaled to (cpus - 1): the project's rule that the actors reserve
    at most one CPU less than the cluster has (pipelines/generate.py, check_resources).
    """
    if cpus < 2:
        raise ValueError(f"--cpus must be at least 2 (the actors may reserve at most cpus - 1), got {cpus}")
    actors = {name: 1 for name in costs}
    threads = lambda: sum(actors[name] * c.threads for name, c in costs.items())
    while True:
        slowest = min(costs, key=lambda name: actors[name] / costs[name].seconds_per_row)
        if threads() + costs[slowest].threads > cpus:
            break
        actors[slowest] += 1
    scale = (cpus - 1) / threads()
    stages = {name: StagePlacement(actors=actors[name], batch_size=c.batch_size,
                                   rows_per_s=actors[name] / c.seconds_per_row,
                                   num_cpus=hundredths(c.threads * scale), torch_threads=c.threads,
                                   max_tasks_in_flight=UNET_IN_FLIGHT if name == "decoder" else None)
              for name, c in costs.items()}
    ceiling = cpus / sum(c.threads * c.seconds_per_row for c in costs.values())
    rule = f"{threads()} torch threads on {cpus} cores"
    return Layout(cpus, "cpu", rule, stages, ceiling)

