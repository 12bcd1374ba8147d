"""Where a stage computes: the device it is given under Ray, and its share of that GPU's memory."""

from __future__ import annotations

from .config import JobConfig, ModelConfig, StageConfig


def check_devices(config: JobConfig, stages: list[str]) -> None:
    """Refuse a CUDA device that the Ray actors of `stages` (the stages a job uses) cannot use as meant.

    Ray narrows CUDA_VISIBLE_DEVICES to the GPUs it assigns an actor with num_gpus > 0, where that
    GPU is `cuda` (= cuda:0): 'cuda:N' for N > 0 does not exist there. An actor with num_gpus 0 sees
    every GPU and would compute on GPU 0 without Ray having reserved any of it."""
    device = config.model.device
    if not device.startswith("cuda"):
        return
    index = device.partition(":")[2]
    for name in stages:
        stage = getattr(config, name)
        if stage.num_gpus == 0:
            raise ValueError(f"{name}.num_gpus is 0 but model.device is {device!r}: its actors would use GPU 0 "
                             f"without a reservation; give {name} a share of a GPU (num_gpus > 0, a fraction "
                             "shares one GPU)")
        if index not in ("", "0"):
            raise ValueError(f"model.device is {device!r}, but Ray shows each actor only the GPU it assigns, as "
                             "cuda:0; use model.device: cuda (Ray picks the GPU)")


def memory_fraction(stage: StageConfig) -> float:
    """The share of its GPU's memory an actor of `stage` may allocate: gpu_memory_fraction, else a
    fractional num_gpus, else all of it."""
    if stage.gpu_memory_fraction is not None:
        return stage.gpu_memory_fraction
    return stage.num_gpus if 0 < stage.num_gpus < 1 else 1.0


def stage_device(model: ModelConfig, stage: StageConfig):
    """The torch device of a stage: model.device, where 'cuda' is the GPU this process sees first
    (under Ray, the one Ray assigned), with the process's CUDA memory capped to its share."""
    import torch

    device = torch.device(model.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        fraction = memory_fraction(stage)
        if fraction < 1:
            torch.cuda.set_per_process_memory_fraction(fraction, device)
    return device
