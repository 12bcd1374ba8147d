"""Row-level checks of a manifest: problems that fail one row, never the job.

Each check takes one Arrow table of manifest rows (a file, or one record batch of it) and returns
(row index, problem) pairs; `check_rows` turns them into {id: "file: column ...: problem at id"},
the first problem of each row. The pipeline sends those rows to errors/ with stage `validate`.
"""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.compute as pc

from .config import TASKS, JobConfig
from .inputs import INPUTS, inputs_used
from .rows import INT64_MAX, strength_start
from .uri_policy import UriPolicy, UriRefused

# Inputs each task needs, each given as `{input}_uri` or `{input}_bytes`.
TASK_INPUTS = {"img2img": ("image",), "inpaint": ("image", "mask"), "variation": ("image",),
               "controlnet_img2img": ("image",)}
MINIMUM = {"seed": 0, "width": 1, "height": 1, "num_inference_steps": 1, "prior_num_inference_steps": 1}


def check_rows(name: str, table: pa.Table, config: JobConfig, ids: list, allowed: tuple[str, ...]) -> dict[str, str]:
    """Row-level problems, id -> message (the first problem found for that row)."""
    found: list[tuple[int, str]] = []
    schema = table.schema
    found += [(r, "column 'prompt' is null") for r in _null_rows(table, "prompt")]
    for column, low in MINIMUM.items():
        if column in schema.names:
            values = table.column(column).to_pylist()
            found += [(r, f"column '{column}' must be >= {low}, got {v}")
                      for r, v in enumerate(values) if v is not None and v < low]
    if "seed" in schema.names:  # a uint64 column can hold seeds torch and the output's int64 cannot
        found += [(r, f"column 'seed' must be <= {INT64_MAX} (a signed 64-bit integer), got {v}")
                  for r, v in enumerate(table.column("seed").to_pylist()) if v is not None and v > INT64_MAX]
    if config.output.size_policy == "reject":
        for column in ("width", "height"):
            values = table.column(column).to_pylist() if column in schema.names else [None] * len(ids)
            default = getattr(config.defaults, column)
            found += [(r, f"column '{column}' is {v if v is not None else default}, not a multiple of 64 "
                       "(output.size_policy=reject)")
                      for r, v in enumerate(values) if (v if v is not None else default) % 64]
    found += _check_tasks(table, config, allowed)
    found += _check_values(table, config)
    found += _check_inputs(name, table, config)
    errors: dict[str, str] = {}
    for r, message in sorted(found, key=lambda f: f[0]):
        errors.setdefault(ids[r], f"{name}: {message} at id {ids[r]!r}")
    return errors


def tasks_of(table: pa.Table, config: JobConfig) -> list[str]:
    tasks = table.column("task").to_pylist() if "task" in table.column_names else [None] * table.num_rows
    return [t if t is not None else config.defaults.task for t in tasks]


def _check_tasks(table: pa.Table, config: JobConfig, allowed: tuple[str, ...]) -> list[tuple[int, str]]:
    schema = table.schema
    tasks = tasks_of(table, config)
    found = []
    for r, task in enumerate(tasks):
        if task not in TASKS:
            found.append((r, f"column 'task' is {task!r}, expected one of {TASKS},"))
        elif task not in allowed:
            found.append((r, f"column 'task': {task!r} needs another decoder than model.decoder="
                             f"{config.model.decoder!r} (which runs {', '.join(allowed)}),"))
    if "strength" in schema.names:
        found += [(r, f"column 'strength' must be within [0, 1], got {v}")
                  for r, v in enumerate(table.column("strength").to_pylist()) if v is not None and not 0 <= v <= 1]
    present = {}
    for kind in ("image", "mask", "hint"):
        present[kind] = [False] * len(tasks)
        for column in (f"{kind}_uri", f"{kind}_bytes"):
            if column in schema.names:
                present[kind] = [p or v for p, v in zip(present[kind], pc.is_valid(table.column(column)).to_pylist())]
        found += [(r, f"column '{kind}_uri': task {t!r} needs a '{kind}_uri' or '{kind}_bytes' value, missing")
                  for r, t in enumerate(tasks) if kind in TASK_INPUTS.get(t, ()) and not present[kind][r]]
    found += [(r, "column 'hint_uri': task 'controlnet' needs a hint (hint_uri/hint_bytes) or an image to "
                  "estimate depth from (image_uri/image_bytes), missing")
              for r, t in enumerate(tasks) if t == "controlnet" and not (present["hint"][r] or present["image"][r])]
    mixes = table.column("mix").to_pylist() if "mix" in schema.names else [None] * len(tasks)
    for r, (task, mix) in enumerate(zip(tasks, mixes)):
        if task != "mix":
            continue
        if not mix:
            found.append((r, "column 'mix': task 'mix' needs a non-empty 'mix' list, missing"))
        for n, item in enumerate(mix or []):
            sources = [k for k in ("text", "image_uri", "image_bytes") if item.get(k) is not None]
            if len(sources) != 1 or item.get("weight") is None:
                found.append((r, f"column 'mix' item {n} needs exactly one of text, image_uri, image_bytes "
                                 "and a weight,"))
    return found


LIMITS = {"width": "max_side", "height": "max_side", "num_inference_steps": "max_steps",
          "prior_num_inference_steps": "max_steps"}  # column -> its upper bound in config.input
FINITE = ("guidance_scale", "prior_guidance_scale", "strength")
# Tasks whose `strength` cuts a schedule short, and the steps column of that schedule.
STRENGTH_STEPS = {"img2img": "num_inference_steps", "controlnet_img2img": "num_inference_steps",
                  "variation": "prior_num_inference_steps"}


def _resolved(table: pa.Table, config: JobConfig, column: str) -> list:
    """A parameter column as the stages see it: the row's value, else the job default."""
    default = getattr(config.defaults, column)
    values = table.column(column).to_pylist() if column in table.column_names else [None] * table.num_rows
    return [default if v is None else v for v in values]


def _check_values(table: pa.Table, config: JobConfig) -> list[tuple[int, str]]:
    """Parameter values (the row's, else the job default's) that always fail at run time, or that
    would hold a job for hours: steps and sizes above the configured limits, fewer than 2 prior
    steps, NaN or infinite numbers, and a strength that leaves no step to run."""
    values = {c: _resolved(table, config, c) for c in (*LIMITS, *FINITE, "strength")}
    found = []
    for column, limit in LIMITS.items():
        bound = getattr(config.input, limit)
        found += [(r, f"column '{column}' is {v}, above input.{limit}={bound}")
                  for r, v in enumerate(values[column]) if v > bound]
    found += [(r, f"column 'prior_num_inference_steps' must be >= 2 (diffusers' UnCLIPScheduler divides by "
                  f"steps - 1), got {v}") for r, v in enumerate(values["prior_num_inference_steps"]) if v < 2]
    for column in FINITE:
        found += [(r, f"column '{column}' must be a finite number, got {v}")
                  for r, v in enumerate(values[column]) if not math.isfinite(v)]
    for r, task in enumerate(tasks_of(table, config)):
        steps_column, strength = STRENGTH_STEPS.get(task), values["strength"][r]
        if steps_column is None or not 0 <= strength <= 1:  # NaN and out-of-range strengths are reported above
            continue
        steps = values[steps_column][r]
        try:
            strength_start(steps, strength)  # the stages' own rule, so validation agrees with the run
        except ValueError:
            found.append((r, f"column 'strength': {strength} x {steps} {steps_column} leaves no step to run "
                             f"(task {task!r} runs int(steps x strength) steps)"))
    return found


def _check_inputs(name: str, table: pa.Table, config: JobConfig) -> list[tuple[int, str]]:
    """The inputs each row's task uses (inputs.inputs_used): URIs the input policy refuses, and inline
    bytes above input.max_input_bytes. An input the task does not use is never read, so it is no
    error. Files are not opened here: a missing or oversized file fails when it is fetched."""
    policy = UriPolicy.for_manifest(config.input.manifest, name, config.input.allowed_uri_prefixes)
    limit = config.input.max_input_bytes

    def problem(uri: str | None, size: int | None) -> tuple[str, str] | None:
        """(which cell, reason) of an input given as a URI and/or inline bytes of `size`."""
        if size is not None:  # inline bytes win over a URI, as in fetch_inputs
            return ("bytes", f"{size} bytes is larger than input.max_input_bytes={limit}") if size > limit else None
        try:
            if uri is not None:
                policy.check(uri)
        except UriRefused as exc:
            return "uri", str(exc)
        return None

    def cells(column: str, sizes: bool = False) -> list:
        if column not in table.column_names:
            return [None] * table.num_rows
        return (pc.binary_length(table.column(column)) if sizes else table.column(column)).to_pylist()

    tasks = tasks_of(table, config)
    hint_given = [u is not None or b is not None for u, b in zip(cells("hint_uri"), cells("hint_bytes", True))]
    found = []
    for kind in INPUTS:
        uris, sizes = cells(f"{kind}_uri"), cells(f"{kind}_bytes", sizes=True)
        for r, task in enumerate(tasks):
            if kind in inputs_used(task, hint_given[r]) and (bad := problem(uris[r], sizes[r])):
                found.append((r, f"column '{kind}_{bad[0]}': {bad[1]}"))
    for r, (task, mix) in enumerate(zip(tasks, cells("mix"))):
        for n, item in enumerate(mix if task == "mix" and mix else []):
            image = item.get("image_bytes")
            if bad := problem(item.get("image_uri"), None if image is None else len(image)):
                found.append((r, f"column 'mix' item {n} image_{bad[0]}: {bad[1]}"))
    return found


def _null_rows(table: pa.Table, column: str) -> list[int]:
    mask = pc.is_null(table.column(column)).to_pylist()
    return [r for r, is_null in enumerate(mask) if is_null]
