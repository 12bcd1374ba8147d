"""Kandinsky 2.2 model stages: plain callable classes over numpy batches. No Ray in here."""

from .config import JobConfig, load_config
from .decoder import DecoderStage
from .movq import MovqStage
from .prior import PriorStage

__all__ = ["JobConfig", "load_config", "PriorStage", "DecoderStage", "MovqStage"]
