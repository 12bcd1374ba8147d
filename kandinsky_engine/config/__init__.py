"""Job configuration: one documented pydantic model per concern, loaded from YAML.

`load_config(path, overrides)` is the single place where defaults are resolved; the CLI's
`--set a.b=value` overrides are parsed against their field's type and applied before validation.

- `sections.py`: the model (`ModelConfig`), per-stage scheduling (`StageConfig`) and generation
  defaults (`GenerationDefaults`) sections;
- `job.py`: the input and output sections and the whole job (`JobConfig`);
- `overrides.py`: `--set` parsing; `loading.py`: YAML, validation, relative paths.
"""

from .job import InputConfig, JobConfig, OutputConfig
from .loading import load_config, resolve_local, resolve_paths, validate
from .overrides import apply_overrides, parse_value
from .sections import (GPU_THREADS, HUB_DECODER, HUB_DEPTH, HUB_PRIOR, SIGNAL_COLUMNS, TASKS, TINY, GenerationDefaults,
                       ModelConfig, StageConfig)

__all__ = ["GPU_THREADS", "HUB_DECODER", "HUB_DEPTH", "HUB_PRIOR", "SIGNAL_COLUMNS", "TASKS", "TINY", "GenerationDefaults",
           "InputConfig", "JobConfig", "ModelConfig", "OutputConfig", "StageConfig", "apply_overrides", "load_config",
           "parse_value", "resolve_local", "resolve_paths", "validate"]
