"""Measurements for the GPU benchmark (jobs/bench_gpu.py): timing, peak memory, FLOPs, the GEMM peak,
the datasheet peak, and the GPU's idle time from the PyTorch profiler. No Ray, no pydantic."""

from __future__ import annotations

import sys
import time

# Dense bf16 tensor-core peak, TFLOP/s, from NVIDIA's datasheets (without sparsity), by a substring
# of torch.cuda.get_device_name. The first match counts: the specific names come first.
SPEC_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
               ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0)]


def log(message: str) -> None:
    print(f"bench_gpu: {message}", file=sys.stderr, flush=True)


def copy(batch: dict) -> dict:
    return {k: v.copy() for k, v in batch.items()}  # stages mark failed rows in place


def spec_tflops(name: str) -> float | None:
    return next((value for key, value in SPEC_TFLOPS if key in name), None)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_peak(device, dtype, n: int) -> float:
    """Measured dense matmul FLOP/s (n x n x n, best of 10 after warm-up)."""
    import torch

    g = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        sync(device)
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * n**3 / best


def timed(fn, device, repeats: int) -> tuple[float, object]:
    """Mean seconds per call of fn() over `repeats` calls (after the caller's warm-up), and the last output."""
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    sync(device)
    return (time.perf_counter() - start) / repeats, out


def peak_memory(device, fn):
    """fn()'s output and the peak GPU memory (GiB) allocated while it ran (None on the CPU)."""
    import torch

    if device.type != "cuda":
        return fn(), None
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    return out, round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def counted(fn) -> tuple[int, object]:
    """(FLOPs of fn() by torch's FlopCounterMode: matmuls, convolutions, attention; fn()'s output)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops(), out


def per_image_flops(run, steps: int) -> int:
    """FLOPs of a stage call at `steps` steps from two calls at 2 and 3 steps (UnCLIP's schedule needs
    two): f(2) + (steps - 2) x (f(3) - f(2)); `run(k)` calls the stage on one row with k steps."""
    two, _ = counted(lambda: run(2))
    three, _ = counted(lambda: run(3))
    return two + (steps - 2) * (three - two)


def busy_intervals(events, cuda: bool) -> list[tuple[float, float]]:
    """(start, end) in microseconds of the device's work: CUDA kernels and copies on a GPU."""
    from torch.autograd import DeviceType

    if not cuda:
        return []
    return sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)


def idle(fn, device) -> dict:
    """Runs fn() under the PyTorch profiler and reports the GPU's idle time over the window from its
    first to its last piece of work: the union of kernel and copy intervals is the busy time, the
    rest idle; `largest_gaps_ms` lists the longest idle stretches (between groups, they are where the
    CPU kept the GPU waiting). On the CPU: the window only (no device to be idle)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync(device)
    wall = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        out = fn()
        sync(device)
    wall = time.perf_counter() - wall
    intervals = busy_intervals(prof.events(), cuda)
    if not intervals:
        return {"wall_s": round(wall, 3), "busy_s": None, "idle_fraction": None, "largest_gaps_ms": []}, out
    busy, gaps, window = union(intervals)
    return {"wall_s": round(wall, 3), "window_s": round(window / 1e6, 3), "busy_s": round(busy / 1e6, 3),
            "idle_fraction": round(1 - busy / window, 4) if window else None,
            "largest_gaps_ms": [round(g / 1e3, 2) for g in sorted(gaps, reverse=True)[:5]]}, out


def union(intervals: list[tuple[float, float]]) -> tuple[float, list[float], float]:
    """(time covered by the sorted intervals, the gaps between them, first start to last end)."""
    busy, gaps, (start, end) = 0.0, [], intervals[0]
    first = start
    for s, e in intervals[1:]:
        if s > end:
            busy += end - start
            gaps.append(s - end)
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    return busy, gaps, end - first


def mfu(flops_per_image: float, images_per_s: float | None, spec: float | None, peak: float) -> dict:
    """Model-FLOPs utilisation against the datasheet's dense bf16 peak and against the measured GEMM peak."""
    if not images_per_s:
        return {"spec": None, "measured_gemm_peak": None}
    achieved = flops_per_image * images_per_s
    return {"spec": round(achieved / (spec * 1e12), 3) if spec else None,
            "measured_gemm_peak": round(achieved / peak, 3)}
