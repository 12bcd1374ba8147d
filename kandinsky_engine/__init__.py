"""Kandinsky model stages: plain callable classes over numpy batches. No Ray in here
(`kandinsky_engine.generate`, the Python API that runs jobs, is kandinsky_engine.jobs.api
(jobs/api.py), imported on use).

- `families/`: one module per model family (its weights, tasks, stages, defaults, tiny model);
- `stages/`: the stage classes, grouped by what they do and shared by the families that use them;
- the rest is the shared ground: config, manifest, rows, inputs, images, storage, model cache.
"""

from pathlib import Path as _Path

# jobs/ and pipelines/ sit beside this folder in the repository and install as kandinsky_engine.jobs
# and kandinsky_engine.pipelines (pyproject.toml). Run from a source tree that was not installed
# (scripts/gpu_check.sh on a lent GPU machine), the repository root joins this package's path so that
# the same names resolve; an installed wheel holds them inside this folder and skips this.
_HERE = _Path(__file__).resolve().parent
if not (_HERE / "jobs").is_dir() and (_HERE.parent / "jobs" / "cli.py").is_file():
    __path__.append(str(_HERE.parent))  # noqa: F821 (a package's __path__)

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
        from kandinsky_engine.jobs.api import generate

        return generate
    raise AttributeError(f"module 'kandinsky_engine' has no attribute {name!r}")
