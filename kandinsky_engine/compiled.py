"""Opt-in `torch.compile` (model.compile) with fixed batch-size buckets, warmed up once per actor.

A compiled graph is specialised to its input shapes, and a job's batches come in every size from 1
to the stage's batch size (the last batch of a unit, rows failed upstream, groups of another size).
Rather than compile on the fly in the middle of a job, each call pads the batch dimension up to the
next bucket (powers of two up to the largest batch) by repeating its last row, and the buckets are
compiled at actor start (`warm_up`). After that, `torch.compiler.set_stance("eager_on_recompile")`
runs any shape that was not warmed up (another image size) eagerly instead of recompiling. Padding
rows are computed and dropped: they change the other rows' results only as any batch shape does.
"""

from __future__ import annotations


BACKEND = "inductor"  # torch.compile backend (tests count compilations with their own)


def buckets(largest: int) -> list[int]:
    """The batch sizes compiled for calls of at most `largest` rows: powers of two below it, and it."""
    sizes, size = [], 1
    while size < largest:
        sizes.append(size)
        size *= 2
    return sizes + [largest]


def _pad(value, n: int, size: int):
    """A tensor whose first dim is the batch (n), padded to `size` rows by repeating its last row;
    dicts are padded item by item; anything else (a 0-dim timestep) passes as is."""
    import torch

    if isinstance(value, dict):
        return {k: _pad(v, n, size) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n and size > n:
        return torch.cat([value, value[-1:].expand(size - n, *value.shape[1:])])
    return value


class Bucketed:
    """`fn(x, **kwargs) -> tensor`, compiled per bucket of x's batch size; x's rows come back unpadded."""

    def __init__(self, fn, largest: int):
        import torch

        self.sizes = buckets(largest)
        # One compiled graph per bucket: keep dynamo from giving up on the later ones.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(self.sizes) + 2)
        self.compiled = torch.compile(fn, dynamic=False, backend=BACKEND)
        self.warm = False

    def __call__(self, x, **kwargs):
        import torch

        n = x.shape[0]
        size = next((s for s in self.sizes if s >= n), n)
        args = _pad(x, n, size), _pad(kwargs, n, size)
        if not self.warm:
            return self.compiled(args[0], **args[1])[:n]
        with torch.compiler.set_stance("eager_on_recompile"):
            return self.compiled(args[0], **args[1])[:n]

    def warm_up(self, example) -> None:
        """Compile every bucket: `example(size)` gives (x, kwargs) of that batch size."""
        import torch

        with torch.inference_mode():
            for size in self.sizes:
                x, kwargs = example(size)
                self(x, **kwargs)
        self.warm = True
