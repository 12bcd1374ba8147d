"""Kandinsky model stages: plain callable classes over numpy batches. No Ray in here.

- `families/`: one module per model family (its weights, tasks, stages, defaults, tiny model);
- `stages/`: the stage classes, grouped by what they do and shared by the families that use them;
- the rest is the shared ground: config, manifest, rows, inputs, images, storage, model cache.
"""

from .config import JobConfig, load_config
from .stages.decoder import DecoderStage
from .stages.movq import MovqStage
from .stages.prior import PriorStage

__all__ = ["JobConfig", "load_config", "PriorStage", "DecoderStage", "MovqStage"]
