"""Kandinsky model stages: plain callable classes over numpy batches. No Ray in here
(`kandinsky_engine.generate`, the Python API that runs jobs, is jobs/api.py, imported on use).

- `families/`: one module per model family (its weights, tasks, stages, defaults, tiny model);
- `stages/`: the stage classes, grouped by what they do and shared by the families that use them;
- the rest is the shared ground: config, manifest, rows, inputs, images, storage, model cache.
"""

from . import families  # noqa: F401 (the family registry: it also hands models its tiny-model builder)
from .config import JobConfig, load_config
from .stages.decoder import DecoderStage
from .stages.movq import MovqStage
from .stages.prior import PriorStage

__all__ = ["JobConfig", "load_config", "generate", "PriorStage", "DecoderStage", "MovqStage"]


def __getattr__(name: str):
    # `generate` runs jobs on Ray (jobs/api.py): imported when asked for, so that the stages stay
    # importable without Ray.
    if name == "generate":
        from jobs.api import generate

        return generate
    raise AttributeError(f"module 'kandinsky_engine' has no attribute {name!r}")
