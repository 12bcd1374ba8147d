"""Host <-> device transfers that never stall the GPU, and noise drawn ahead on a background thread.

On CUDA a copy from pageable host memory blocks the host until every kernel queued before it has
run: one such copy at the start of a group leaves the GPU idle while the CPU prepares the group.
Here host tensors are pinned and copied with `non_blocking=True` (`upload`), results come back the
same way with one synchronisation per call (`download`), and the per-row noise of the next group is
drawn on a background thread (`NoisePrefetch`) while the device runs the current one. Each row's
noise still comes from its own CPU generator, draw by draw, so it is the same tensor whichever
thread draws it. On the CPU every function here computes what the plain calls would.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


def _pinned(tensor):
    return tensor if tensor.is_pinned() else tensor.pin_memory()


def upload(value, device, dtype=None):
    """A numpy array or CPU tensor on `device`: pinned and copied without blocking the host (CUDA), then
    cast there (a cast on the way would stage through pageable memory, which blocks)."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
    if device.type == "cuda":
        tensor = _pinned(tensor).to(device, non_blocking=True)
    else:
        tensor = tensor.to(device)
    return tensor if dtype is None else tensor.to(dtype)


def download(tensors: list) -> list[np.ndarray]:
    """Device tensors -> numpy arrays, copied into pinned memory without blocking, then one
    synchronisation for all of them (on the CPU: the tensors' own memory, no copy)."""
    import torch

    if not tensors:
        return []
    device = tensors[0].device
    if device.type != "cuda":
        return [t.numpy() for t in tensors]
    hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for host, tensor in zip(hosts, tensors):
        host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(device).synchronize()
    return [h.numpy() for h in hosts]


@dataclass(frozen=True)
class NoiseSpec:
    """A group's noise: `draws` standard-normal tensors of `shape` per row, from each row's generator
    seeded with its seed, in the model's dtype."""

    seeds: tuple[int, ...]
    shape: tuple[int, ...]
    draws: int
    dtype: str  # torch dtype name, e.g. "float32"


def noise_spec(seeds, shape, draws: int, dtype) -> NoiseSpec:
    return NoiseSpec(tuple(int(s) for s in seeds), tuple(shape), int(draws), str(dtype).replace("torch.", ""))


def draw_host(spec: NoiseSpec, pin: bool):
    """(draws, rows * shape[0], ...) on the CPU, row r's draws from its own generator in order."""
    import torch

    dtype = getattr(torch, spec.dtype)
    # One CPU generator per row, seeded with the row's seed (rows.generators, not imported: rows reads the config)
    rows = [torch.stack([torch.randn(spec.shape, generator=g, dtype=dtype) for _ in range(spec.draws)])
            for g in (torch.Generator("cpu").manual_seed(int(s)) for s in spec.seeds)]
    noise = torch.cat(rows, dim=1)
    return noise.pin_memory() if pin else noise


class NoisePrefetch:
    """Draws groups' noise ahead of need on one background thread.

    `submit(spec)` queues a group's draws (pinned on CUDA); `take(spec)` returns them on the device,
    waiting for the thread if they are not ready, or drawing them on the spot if they were never
    submitted. `clear()` forgets what was submitted and not taken (a chunk split after a failure
    asks for other groups). `events` keeps the recent (event, spec, perf_counter time, thread name)
    records: 'ready' when a group is drawn, 'taken' when its group starts, 'queued' when the stage
    has queued the group's last step (tests and the GPU benchmark read them)."""

    def __init__(self, device):
        self.device = device
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="noise-prefetch")
        self.pending: dict[NoiseSpec, Future] = {}
        self.events: deque = deque(maxlen=512)

    def _draw(self, spec: NoiseSpec):
        noise = draw_host(spec, pin=self.device.type == "cuda")
        self.note("ready", spec)
        return noise

    def note(self, event: str, spec: NoiseSpec) -> None:
        self.events.append((event, spec, time.perf_counter(), threading.current_thread().name))

    def submit(self, spec: NoiseSpec) -> None:
        if spec not in self.pending:
            self.pending[spec] = self.pool.submit(self._draw, spec)

    def take(self, spec: NoiseSpec):
        future = self.pending.pop(spec, None)
        host = future.result() if future is not None else self._draw(spec)
        self.note("taken", spec)
        return upload(host, self.device)

    def clear(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()
