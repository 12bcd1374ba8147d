"""Per-row generation parameters: job defaults filled in, seeds derived, rows grouped.

A batch is a dict of numpy columns (Ray Data's "numpy" batch format). Every stage reads the
resolved columns below, so the stages never look at job defaults themselves.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np

from .config import GenerationDefaults

# Resolved parameter columns and their kinds. A manifest may carry any of them.
PARAM_COLUMNS = {
    "task": str,
    "negative_prompt": str,
    "seed": int,
    "width": int,
    "height": int,
    "num_inference_steps": int,
    "guidance_scale": float,
    "prior_num_inference_steps": int,
    "prior_guidance_scale": float,
    "strength": float,
}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Per-row failure, set by the stage that failed; later stages pass such rows through untouched
# and the writer sends them to errors/ instead of data/. "" means no error: Ray turns an object
# column that is all None into float NaN between stages, while a string column stays a string.
ERROR_COLUMNS = ("error_stage", "error_type", "error_message")


def derive_seed(job_seed: int, row_id: str) -> int:
    """Seed of a row without one: a hash of (job seed, id), so it depends on nothing else.

    63 bits, so it fits a signed int64 Parquet column and `torch.Generator.manual_seed`.
    """
    digest = hashlib.sha256(f"{job_seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def resolve_params(table, defaults: GenerationDefaults) -> tuple[dict, dict[int, str]]:
    """Every PARAM_COLUMNS column for the rows of an Arrow table: the row's value where present and
    not null, else the default; seeds derived from the id where absent.

    Works on Arrow values, not numpy: Ray's numpy conversion turns an integer column with nulls
    into float64, which rounds 63-bit seeds. Returns (columns, {row index: problem}); a row with a
    problem gets a placeholder value and must be marked failed by the caller. (pyarrow is imported
    here, not at the top: the stages import this module and run without it, see jobs/bench_gpu.py.)
    """
    import pyarrow as pa

    arrow_types = {str: pa.string(), int: pa.int64(), float: pa.float64()}
    n, ids = table.num_rows, table["id"].to_pylist()
    columns, problems = {}, {}
    tasks = None  # the rows' resolved tasks: `task` comes first, and picks the per-task defaults
    for name, kind in PARAM_COLUMNS.items():
        given = table[name].to_pylist() if name in table.column_names else [None] * n
        values = []
        for i, value in enumerate(given):
            if value is None and name == "seed":
                value = derive_seed(defaults.seed, ids[i])
            elif value is None:
                per_task = defaults.task_defaults.get(tasks[i], {}) if tasks else {}
                value = per_task.get(name, getattr(defaults, name))
            if kind is int and not INT64_MIN <= value <= INT64_MAX:
                problems.setdefault(i, f"column '{name}' is {value}, outside the int64 range")
                value = 0
            values.append(value)
        columns[name] = pa.array(values, arrow_types[kind])
        if name == "task":
            tasks = values
    return columns, problems


def numpy_batch(table) -> dict[str, np.ndarray]:
    """An Arrow table as Ray Data's "numpy" batch format hands it to a stage (strings, bytes and
    lists as 1-D object arrays)."""
    return {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}


def object_column(values) -> np.ndarray:
    """A 1-D object column, one cell per row. `np.array(rows, dtype=object)` would make a 2-D
    array whenever every row holds a list (or array) of the same length."""
    values = list(values)
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out


def failed(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Boolean mask of rows that an earlier stage marked as failed."""
    return np.array([bool(m) for m in batch["error_message"]], dtype=bool)


def mark_failed(batch: dict[str, np.ndarray], i: int, stage: str, exc: BaseException) -> None:
    batch["error_stage"][i] = stage
    batch["error_type"][i] = type(exc).__name__
    batch["error_message"][i] = str(exc)


def is_null(value) -> bool:
    """Null in a numpy batch: None, or the NaN (np.float32 on Ray 2.60) that Ray makes of an all-None object column."""
    return value is None or (isinstance(value, (float, np.floating)) and np.isnan(value))


def group_rows(batch: dict[str, np.ndarray], key) -> dict[tuple, np.ndarray]:
    """Indices of the rows that share `key(i)`: each group runs as one homogeneous sub-batch."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in range(len(batch["id"])):
        groups[key(i)].append(i)
    return {k: np.asarray(v) for k, v in groups.items()}


def generators(seeds) -> list:
    """One CPU generator per row: noise never depends on the device or on batch-mates."""
    import torch

    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def strength_start(num_steps: int, strength: float) -> int:
    """Index of the first timestep a `strength` keeps: diffusers' `get_timesteps` (img2img, emb2emb)."""
    init_steps = min(int(num_steps * strength), num_steps)
    if init_steps < 1:
        raise ValueError(f"strength {strength} x {num_steps} steps leaves no step to run")
    return num_steps - init_steps


def working_size(height: int, width: int, scale_factor: int) -> tuple[int, int]:
    """(H, W) the model works at: the requested size rounded up as diffusers rounds it."""
    lh, lw = latent_size(height, width, scale_factor)
    return lh * scale_factor, lw * scale_factor


def latent_size(height: int, width: int, scale_factor: int) -> tuple[int, int]:
    """diffusers' `downscale_height_and_width`: round the image up to a multiple of scale_factor**2,
    return the latent size (image / scale_factor)."""
    return -(-height // scale_factor**2) * scale_factor, -(-width // scale_factor**2) * scale_factor


def check_columns(batch: dict[str, np.ndarray], required, stage: str) -> None:
    """Refuse a batch without the columns a stage reads (a caller's mistake, not a row's)."""
    missing = [c for c in required if c not in batch]
    if missing:
        raise ValueError(f"{stage}: batch lacks columns {missing}")
