"""Opt-in float8 for the decoder U-Net (model.fp8), with torchao's dynamic-scale recipe.

Every linear layer whose dimensions are multiples of 16 runs as a float8 (e4m3) matmul with a scale
per row of the activations and per output row of the weights (`Float8DynamicActivationFloat8WeightConfig`
with `PerRow`): torch's `_scaled_mm`, which needs compute capability 8.9 or newer (Ada, Hopper,
Blackwell). Convolutions run in float8 too where torchao has a kernel for them (per-tensor scales,
through its float8 conv3d, which needs compute capability 10.0 and the mslk kernels); elsewhere, on
Hopper among others, they stay in bfloat16. Weights are converted once, when the stage loads.

Off by default. It changes float results beyond the bfloat16 bound: its distance from bfloat16 is
measured by the GPU benchmark (jobs/bench_gpu.py, `fp8`). `fingerprint_value` is what the run
fingerprint records for it, so a resume cannot mix float8 and bfloat16 rows.
"""

from __future__ import annotations

MIN_CAPABILITY = (8, 9)  # float8 matmuls (torch._scaled_mm)
CONV_CAPABILITY = (10, 0)  # torchao's float8 convolution (mslk kernels)
RECIPE = "e4m3 dynamic, per-row linear, per-tensor conv where supported"


def torchao_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchao")
    except PackageNotFoundError:
        return None


def fingerprint_value() -> str:
    """The run fingerprint's record of model.fp8: the recipe and the torchao version that runs it."""
    return f"{RECIPE}; torchao {torchao_version() or 'not installed'}"


def check_device(device, dtype) -> tuple[int, int]:
    """Refuse a device or dtype that cannot run the float8 recipe, with the reason; returns the
    device's compute capability."""
    import torch

    if device.type != "cuda":
        raise ValueError(f"model.fp8 needs an NVIDIA GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
                         f"or newer (Ada, Hopper, Blackwell); this stage runs on {device}")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ValueError(f"model.fp8: {torch.cuda.get_device_name(device)} has compute capability "
                         f"{capability[0]}.{capability[1]}; float8 matmuls need {MIN_CAPABILITY[0]}."
                         f"{MIN_CAPABILITY[1]} or newer (Ada, Hopper, Blackwell). Turn model.fp8 off on this GPU")
    if dtype != torch.bfloat16:
        raise ValueError(f"model.fp8 quantizes bfloat16 weights; set model.dtype: bfloat16 (got {dtype})")
    if torchao_version() is None:
        raise ValueError("model.fp8 needs the torchao package (pip install torchao==0.18.0), which is not installed")
    return capability


def _multiple_of_16(*sizes: int) -> bool:
    return all(size % 16 == 0 for size in sizes)


def to_float8(unet, device) -> dict[str, int]:
    """Convert the U-Net's layers in place; returns how many linear and convolution layers run in float8."""
    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    capability = check_device(device, unet.dtype)
    counts = {"linear": 0, "conv": 0}

    def linear(module, name) -> bool:
        ok = isinstance(module, torch.nn.Linear) and _multiple_of_16(module.in_features, module.out_features)
        counts["linear"] += ok
        return ok

    quantize_(unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=linear)
    if capability >= CONV_CAPABILITY and _has_float8_conv():
        def conv(module, name) -> bool:
            ok = isinstance(module, torch.nn.Conv2d) and _multiple_of_16(module.in_channels, module.out_channels)
            counts["conv"] += ok
            return ok

        quantize_(unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor()), filter_fn=conv)
    return counts


def _has_float8_conv() -> bool:
    try:
        from torchao.utils import _is_mslk_available
    except ImportError:
        return False
    return bool(_is_mslk_available())
