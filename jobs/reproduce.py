"""`kandinsky-batch verify OUT --recompute N` (or `--recompute-id ID`): the proof that a dataset is
what its metadata says, without trusting its writer.

Sampled rows (or the named ones) are rendered again on this machine, from the output's own record:
the job config in `_RUN.json`, the manifest rows it names (checked against the units' digests by
`verify`), and the unit each row was committed in. A row is computed with exactly the rows it was
computed with (its unit, or for a retried attempt the unit's rows not committed before it), through
the job's own code path without Ray: the read, the prepare step, input fetching, the model stages
(fused or one after another, at their thread counts) and the image encoder. Then its image is
compared with the stored one:

- `identical`: the same bytes;
- `same pixels`: other bytes that decode to the same pixels (another PNG/JPEG encoder build);
- `within bound` / `differs`: the largest per-channel difference, in /255, against `tolerance`.

Byte identity is expected when this machine's device type and libraries are the ones the run
fingerprint recorded (torch's kernels can still differ between CPU generations: then a small
difference is reported as within the bound, not as identical); across devices or library builds
the bound is what holds.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from kandinsky_engine.normalize import text_ids
from kandinsky_engine.storage import url_to_fs
from kandinsky_engine.units import file_key
from kandinsky_engine.pipelines.output import DATA, INDEX, parse_shard, read_records

from .samples import SHARD_READERS


@dataclass
class Recomputed:
    id: str
    shard: str
    status: str  # identical, same pixels, within bound, differs, failed
    max_delta: int | None  # largest per-channel difference in /255 (None: no image to compare)
    detail: str = ""


@dataclass
class Recomputation:
    rows: list[Recomputed]
    expect_identical: bool  # this machine's device type and libraries are the fingerprint's
    tolerance: int

    @property
    def ok(self) -> bool:
        return all(r.status in ("identical", "same pixels", "within bound") for r in self.rows)


def recompute(path: str, count: int = 0, ids: list[str] = (), *, config=None, device: str | None = None,
              tolerance: int = 1, rng: random.Random | None = None) -> Recomputation:
    """Render `count` sampled rows and the rows `ids` of the output at `path` again; compare."""
    from kandinsky_engine.identity import library_versions
    from kandinsky_engine.manifest import validate_manifest

    from .resume import read_run
    from .verify import job_config

    fs, root = url_to_fs(path.rstrip("/"), config.storage_options if config is not None else {})
    run = read_run(fs, root)
    if run is None:
        raise ValueError(f"{path}: no _RUN.json: not the output of a job run by this tool")
    config, _ = job_config(path, run, config)
    if device is not None:  # e.g. a GPU run checked on a CPU: float32 there, compared within the bound
        model = config.model.model_copy(update={"device": device, **({"dtype": "float32"} if device == "cpu" else {})})
        config = config.model_copy(update={"model": model})
    manifest = validate_manifest(config)
    shards = _shards_of(fs, root, count, list(ids), manifest, config, rng or random.Random())
    chain = _Chain(config, manifest)
    rows = []
    for shard, wanted in shards.items():
        rows += _check_shard(fs, root, shard, wanted, config, manifest, chain, tolerance)
    recorded = run["inputs"]
    expect = (recorded.get("libraries") == library_versions() and recorded.get("device") == config.model.device.split(":")[0]
              and recorded.get("dtype") == config.model.dtype)
    return Recomputation(rows, expect, tolerance)


def _shards_of(fs, root: str, count: int, ids: list[str], manifest, config, rng) -> dict[str, list[str]]:
    """{data shard: ids to recompute}: `count` shards spread over the index, one random row each,
    plus the shard of each named id (found through its manifest file and unit)."""
    from .samples import _spread

    files = [r["file"] for r in read_records(fs, f"{root}/{INDEX}") if r["file"].startswith(f"{DATA}/")]
    chosen: dict[str, list[str]] = {}
    for shard in _spread(sorted(files), count):
        shard_ids = _read_ids(fs, f"{root}/{shard}")
        if shard_ids:
            chosen.setdefault(shard, []).append(rng.choice(shard_ids))
    for row_id in ids:
        unit = _unit_of(row_id, manifest, config)
        for shard in (f for f in files if f.startswith(f"{DATA}/{unit[0]}/part-{unit[1]:012d}-")):
            if row_id in _read_ids(fs, f"{root}/{shard}"):
                chosen.setdefault(shard, []).append(row_id)
                break
        else:
            raise ValueError(f"id {row_id!r} is not in data/ (it failed, or its unit is not committed)")
    return chosen


def _unit_of(row_id: str, manifest, config) -> tuple[str, int]:
    """(folder key, unit start) of the manifest row with id `row_id`."""
    for file in manifest.files:
        fs, _ = url_to_fs(file.path, config.storage_options)
        with fs.open(file.path, "rb") as f:
            column = text_ids(pq.read_table(f, columns=["id"])["id"].combine_chunks())
        if row_id in column:
            rows_per_block = config.rows_per_block()
            return file_key(file.relpath), column.index(row_id) // rows_per_block * rows_per_block
    raise ValueError(f"id {row_id!r} is in no manifest file")


def _read_ids(fs, path: str) -> list:
    from kandinsky_engine.pipelines.shards import format_of

    with fs.open(path, "rb") as f:
        return format_of(path).ids(f)


class _Chain:
    """The job's model stages in this process, as its actors run them."""

    def __init__(self, config, manifest):
        from kandinsky_engine.pipelines.generate import Chunked, Fused, fused_config, model_stages
        from kandinsky_engine.stages.movq import MovqStage

        stages = model_stages(config, manifest)
        extra = lambda cls, kwargs: {**kwargs, "encode": False} if issubclass(cls, MovqStage) else kwargs  # noqa: E731
        if config.fuse_stages:
            self.steps = [(Fused([(cls, stage.batch_size, extra(cls, kw)) for _, cls, stage, kw in stages],
                                 config.decoder.threads(), config=fused_config(config, stages)), config.decoder.threads())]
        else:
            self.steps = [(Chunked(cls, stage.batch_size, config=config, **extra(cls, kw)), stage.threads())
                          for _, cls, stage, kw in stages]

    def __call__(self, batch: dict) -> dict:
        import torch

        for step, threads in self.steps:
            torch.set_num_threads(threads)  # each actor process has its own
            batch = step(batch)
        return batch


def _check_shard(fs, root, shard: str, wanted: list[str], config, manifest, chain, tolerance) -> list[Recomputed]:
    from kandinsky_engine.columns import passthrough_fields
    from kandinsky_engine.inputs import FETCH_TASKS, fetch_inputs
    from kandinsky_engine.rows import numpy_batch
    from kandinsky_engine.stages.movq import encode_images
    from kandinsky_engine.pipelines.generate import light_step
    from kandinsky_engine.pipelines.prepare import prepare_units
    from kandinsky_engine.pipelines.read import read_units

    found = parse_shard(f"{root}/{shard}", root, 0)
    file = next(f for f in manifest.files if file_key(f.relpath) == found.key)
    rows_per_block = config.rows_per_block()
    retry = {}
    if found.attempt > 1:  # the attempt ran the unit's rows that no earlier attempt had committed
        earlier = set()
        for name in fs.ls(f"{root}/{DATA}/{found.key}", detail=False):
            other = parse_shard(name, root, 0)
            if other and other.start == found.start and other.attempt < found.attempt:
                earlier.update(_read_ids(fs, name))
        retry = {found.start: (found.attempt, frozenset(earlier))}
    table = next(read_units(file, [found.start], retry, rows_per_block, config.storage_options))
    prepared = prepare_units(table, row_errors=manifest.row_errors, defaults=config.defaults,
                             passthrough=passthrough_fields(manifest.schema))
    batch = numpy_batch(prepared)
    if manifest.tasks & set(FETCH_TASKS):
        batch = light_step(fetch_inputs)(batch, config=config, manifest_file=manifest.files[0].path)
    batch = encode_images(chain(batch), output=config.output)
    again = dict(zip(batch["id"], zip(batch["image"], batch["error_message"])))
    stored = {r["id"]: r["image"] for r in SHARD_READERS["." + shard.rsplit(".", 1)[1]](fs, f"{root}/{shard}", 1 << 30)}
    return [_compare(row_id, shard, stored.get(row_id), *again.get(row_id, (None, "not recomputed")), tolerance)
            for row_id in wanted]


def _compare(row_id, shard, stored: bytes | None, image: bytes | None, error: str, tolerance: int) -> Recomputed:
    if image is None or stored is None:
        return Recomputed(row_id, shard, "failed", None, error or "no stored image")
    if image == stored:
        return Recomputed(row_id, shard, "identical", 0)
    a, b = _pixels(image), _pixels(stored)
    if a.shape != b.shape:
        return Recomputed(row_id, shard, "differs", None, f"size {a.shape[1]}x{a.shape[0]}, stored {b.shape[1]}x{b.shape[0]}")
    delta = int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
    status = "same pixels" if delta == 0 else "within bound" if delta <= tolerance else "differs"
    return Recomputed(row_id, shard, status, delta)


def _pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def report(result: Recomputation, path: str) -> str:
    expect = ("this machine's device type and libraries are the run's: identical bytes expected"
              if result.expect_identical else
              f"this machine's device type or libraries differ from the run's: within {result.tolerance}/255 expected")
    lines = [f"{path}: {len(result.rows)} row(s) rendered again ({expect})"]
    for r in result.rows:
        delta = "" if r.max_delta is None else f", max |Δ| {r.max_delta}/255"
        lines.append(f"  {r.id!r} ({r.shard}): {r.status}{delta}{': ' + r.detail if r.detail else ''}")
    return "\n".join(lines)
