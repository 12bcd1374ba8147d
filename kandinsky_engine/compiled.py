"""Opt-in `torch.compile` (model.compile) with fixed batch-size buckets, compiled once per actor.

A compiled graph is specialised to its input shapes. A job's calls come in a few sizes, known in
advance: with classifier-free guidance every U-Net and prior call has an even number of rows (the
unconditional half and the conditional half), and units are split into full chunks of the stage's
batch size, so nearly every call has the largest size; the last chunk of a unit, rows failed
upstream and groups of another size or step count are smaller. The buckets are therefore the
largest size and half of it, in multiples of the call's step (`buckets`): two compiles per model.
A call is padded up to the smallest bucket that holds it by repeating its last row; padding rows are
computed and dropped (they change the other rows' results only as any batch shape does).

Every bucket is compiled when the actor starts (`warm_up`), at the job's default image size. After
that nothing compiles: a call that would need another graph (another image size, a shape no bucket
holds, a guard that fails) runs eagerly instead, and each such fallback is logged once per shape and
counted (`Bucketed.fallbacks`, and FALLBACKS across the process). Graph breaks found while warming
up are logged and counted too (`graph_breaks`): each is a piece of the model that runs eagerly.

Compiled code is cached in a directory reused by every actor on the node (`TORCHINDUCTOR_CACHE_DIR`,
default `<model.cache_dir>/inductor`): the second actor to start finds the first one's kernels and
skips inductor's code generation (dynamo still traces the model in each process).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

BACKEND = "inductor"  # torch.compile backend (tests count compilations with their own)
FALLBACKS: Counter = Counter()  # name -> eager calls after warm-up, in this process
log = logging.getLogger("kandinsky_engine")


def buckets(largest: int, step: int = 1) -> list[int]:
    """The batch sizes compiled for calls of at most `largest` rows that come in multiples of `step`:
    `largest`, and half of it rounded up to a multiple of step where that is smaller."""
    half = -(-largest // 2 // step) * step if largest >= 2 * step else largest
    return sorted({max(step, half), largest})


def use_cache_dir(cache_dir: str | None) -> str:
    """Point inductor's cache at `cache_dir`/inductor unless TORCHINDUCTOR_CACHE_DIR is set: node-local,
    shared by the actors of the node. Returns the directory used."""
    if cache_dir and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir) / "inductor")
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")


def _pad(value, n: int, size: int):
    """A tensor whose first dim is the batch (n), padded to `size` rows by repeating its last row;
    dicts are padded item by item; anything else (a 0-dim timestep, a module) passes as is."""
    import torch

    if isinstance(value, dict):
        return {k: _pad(v, n, size) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n and size > n:
        return torch.cat([value, value[-1:].expand(size - n, *value.shape[1:])])
    return value


def signature(x, kwargs: dict) -> tuple:
    """The shapes, dtypes and devices of a call's tensors: what a static graph is specialised to."""
    import torch

    def describe(value):
        if isinstance(value, dict):
            return tuple((k, describe(v)) for k, v in sorted(value.items()))
        if isinstance(value, torch.Tensor):
            return (tuple(value.shape), str(value.dtype), value.device.type)
        return None

    return describe(x), describe(kwargs)


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


class Bucketed:
    """`fn(x, **kwargs) -> tensor`, compiled per bucket of x's batch size; x's rows come back unpadded.

    `sizes`: the buckets (see `buckets`); `name`: for the log; `mode`: torch.compile's mode
    ("reduce-overhead" records CUDA graphs of each bucket: the prior's many small kernels)."""

    def __init__(self, fn, sizes: list[int], name: str = "model", mode: str | None = None,
                 cache_dir: str | None = None):
        import torch

        self.fn, self.sizes, self.name = fn, sorted(sizes), name
        use_cache_dir(cache_dir)
        # One compiled graph per bucket: keep dynamo from giving up on the later ones.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(self.sizes) + 2)
        options = {"mode": mode} if mode and BACKEND == "inductor" else {}
        self.compiled = torch.compile(fn, dynamic=False, backend=BACKEND, **options)
        # CUDA graphs replay into static output buffers: each call starts a new step, so that the
        # previous call's outputs (consumed by then) may be overwritten.
        self.graphs = mode == "reduce-overhead"
        self.warm = False
        self.warmed: set = set()  # signatures compiled at warm-up
        self.fallbacks: Counter = Counter()  # signature -> eager calls
        self.graph_breaks = 0

    def bucket(self, n: int) -> int:
        return next((s for s in self.sizes if s >= n), n)

    def __call__(self, x, **kwargs):
        import torch

        n = x.shape[0]
        size = self.bucket(n)
        x, kwargs = _pad(x, n, size), _pad(kwargs, n, size)
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if not self.warm:
            return self.compiled(x, **kwargs)[:n]
        key = signature(x, kwargs)
        if key in self.warmed:
            try:
                with torch.compiler.set_stance("fail_on_recompile"):
                    return self.compiled(x, **kwargs)[:n]
            except torch._dynamo.exc.RecompileError as exc:  # a guard other than the shapes failed
                self._fallback(key, f"a guard failed ({str(exc).splitlines()[0][:200]})")
        elif key not in self.fallbacks:
            self._fallback(key, f"no bucket was compiled for this shape (buckets {self.sizes} at the job's "
                                "default image size)")
        self.fallbacks[key] += 1
        FALLBACKS[self.name] += 1
        return self.fn(x, **kwargs)[:n]

    def _fallback(self, key, why: str) -> None:
        log.warning("compiled %s: running a call of shapes %s eagerly: %s", self.name, key[0], why)
        self.warmed.discard(key)

    def warm_up(self, example) -> None:
        """Compile every bucket: `example(size)` gives (x, kwargs) of that batch size."""
        import time

        import torch

        started, breaks = time.perf_counter(), _graph_breaks()
        with torch.inference_mode():
            for size in self.sizes:
                x, kwargs = example(size)
                self(x, **kwargs)
                self.warmed.add(signature(x, kwargs))
        self.graph_breaks = _graph_breaks() - breaks
        self.warm = True
        log.info("compiled %s: buckets %s in %.1f s, %d graph break(s)%s", self.name, self.sizes,
                 time.perf_counter() - started, self.graph_breaks,
                 "" if not self.graph_breaks else " (those parts run eagerly)")

    @property
    def fallback_calls(self) -> int:
        return sum(self.fallbacks.values())
