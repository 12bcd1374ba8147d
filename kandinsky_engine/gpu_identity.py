"""The GPU a job computes on, as its run fingerprint records it, and the rule for resuming elsewhere.

What is guaranteed on a GPU: a rerun or resume of the same job on the same GPU model with the same
CUDA, cuDNN and cuBLAS builds gives byte-identical images. cuBLAS and cuDNN pick their kernels by GPU
model, library build and problem shape, so another GPU model or library build can change a row's
float rounding (within the stated tolerances, never the row's meaning). A resume on a different GPU
model or library build is therefore refused unless `--allow-device-change`, and every such change
is recorded in `_RUN.json` (`device_changes`). The driver version is recorded too; a change of
driver alone is allowed (kernels and their choice come from the libraries) and recorded.

`record()` reads the GPU of this process; `job_record()` that of the job: this process's, or where
the driver process sees no GPU (a Ray head node without one), a one-off probe task on a GPU of the
Ray cluster. Both are None for a CPU job, whose fingerprint then has no `gpu` entry at all.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger("kandinsky_engine")

# What a resume may not change without --allow-device-change (the driver may change: recorded only).
BINDING = ("model", "capability", "cuda", "cudnn", "cublas")
PROBE_TIMEOUT_S = 300  # waiting for a GPU of the cluster to run the probe


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version (e.g. 580.159.04), from /proc or NVML."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        found = re.search(r"Kernel Module(?: for \S+)?\s+([0-9][0-9.]+)", text)
        if found:
            return found.group(1)
    except OSError:
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return None


def cublas_version() -> str | None:
    """cuBLAS as this process loaded it (cublasLtGetVersion of the libcublasLt torch mapped: the build
    that computes), else the version of the installed nvidia-cublas wheel."""
    import ctypes

    import torch

    try:
        torch.ones(2, 2, device="cuda") @ torch.ones(2, 2, device="cuda")  # makes torch load cuBLAS(Lt)
        paths = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                 if "libcublasLt.so" in line}
        for path in sorted(paths):
            lib = ctypes.CDLL(path)
            lib.cublasLtGetVersion.restype = ctypes.c_size_t
            v = int(lib.cublasLtGetVersion())  # major * 10000 + minor * 100 + patch
            return f"{v // 10000}.{v // 100 % 100}.{v % 100}"
    except Exception:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for name in ("nvidia-cublas-cu12", "nvidia-cublas-cu13", "nvidia-cublas"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def record() -> dict | None:
    """This process's GPU (its first visible device): model, compute capability, driver, CUDA,
    cuDNN and cuBLAS versions; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(device)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"model": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}",
            "driver": driver_version(), "cuda": torch.version.cuda, "cudnn": None if cudnn is None else str(cudnn),
            "cublas": cublas_version()}


def job_record(config) -> dict | None:
    """The GPU record of a job: None unless model.device is cuda; this process's GPU if it has one,
    else a probe on a GPU of the connected Ray cluster; `{"model": None}` where neither is possible
    (no GPU in the cluster yet: the job then stops at its resource check)."""
    if not config.model.device.startswith("cuda"):
        return None
    local = record()
    if local is not None:
        return local
    import ray

    if not ray.is_initialized() or not ray.cluster_resources().get("GPU"):
        return {"model": None}
    probe = ray.remote(num_gpus=0.01, num_cpus=0)(record)
    try:
        return ray.get(probe.remote(), timeout=PROBE_TIMEOUT_S) or {"model": None}
    except Exception as exc:  # no GPU free for the probe: recorded as unknown
        log.warning("the GPU record of this run could not be read (%s): recorded as unknown", type(exc).__name__)
        return {"model": None}


def describe(gpu: dict | None) -> str:
    if not gpu or not gpu.get("model"):
        return "an unrecorded GPU"
    return (f"{gpu['model']} (compute {gpu.get('capability')}, CUDA {gpu.get('cuda')}, cuDNN {gpu.get('cudnn')}, "
            f"cuBLAS {gpu.get('cublas')}, driver {gpu.get('driver')})")


def changed(old: dict | None, new: dict | None) -> list[str]:
    """The fields in which `new` differs from `old` ([] where either is unrecorded)."""
    if not old or not new or not old.get("model") or not new.get("model"):
        return []
    return [key for key in (*BINDING, "driver") if old.get(key) != new.get(key)]


def binding(fields: list[str]) -> bool:
    """Whether a change of these fields needs --allow-device-change."""
    return any(field in BINDING for field in fields)
