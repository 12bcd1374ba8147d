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

    device = torch.device(device_name(model))
    check_dtype(model, device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        fraction = memory_fraction(stage)
        if fraction < 1:
            torch.cuda.set_per_process_memory_fraction(fraction, device)
    return device


def device_name(model: ModelConfig) -> str:
    """model.device, with 'auto' (left so by a stage built outside a job) as this process sees it."""
    if model.device != "auto":
        return model.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_auto(config: JobConfig) -> JobConfig:
    """`model.device` and `model.dtype` of 'auto' made concrete, the same way on every machine (the
    fingerprint records them): 'cuda' when the stages that run reserve GPUs, else 'cpu'; bfloat16 on
    'cuda', float32 on 'cpu'. Whether the GPU has bfloat16 is checked where it runs (`check_dtype`)."""
    model = config.model
    if model.device != "auto" and model.dtype != "auto":
        return config
    scheduling = [config.decoder] if config.fuse_stages else [config.prior, config.text_encoder, config.decoder,
                                                               config.movq]
    device = model.device if model.device != "auto" else ("cuda" if any(s.num_gpus > 0 for s in scheduling) else "cpu")
    dtype = model.dtype if model.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    return config.model_copy(update={"model": model.model_copy(update={"device": device, "dtype": dtype})})


def check_dtype(model: ModelConfig, device) -> None:
    """Refuse bfloat16 on a GPU that lacks it (before Ampere), naming the setting to change."""
    import torch

    if model.dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"model.dtype is bfloat16 (the default on a GPU), but {torch.cuda.get_device_name(device)} "
                           "has no bfloat16: set model.dtype: float16 (or float32)")
