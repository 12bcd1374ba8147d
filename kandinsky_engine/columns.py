"""The columns of a job: what the engine reads from a manifest, what it writes, what it reserves.

The output schema is fixed per job, derived from the manifest's schema: the engine's own columns
with the types below, then every other manifest column ("pass-through") with its manifest type.
Every data shard of a job has exactly this schema, whatever its rows hold (a unit whose
pass-through column is all null still writes it with the manifest's type), so `data/` reads as
one table with pyarrow and Hugging Face `datasets`.

Pass-through columns never go through the numpy model stages: Ray's Arrow -> numpy conversion
turns an int64 column with nulls into float64 (rounding 63-bit values) and an all-null column
into NaN floats. They travel as one Arrow IPC blob per unit of work instead (`pack_passthrough`)
and are joined back by id in the writer, so their values and types come out as they went in.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import metadata

import pyarrow as pa

# Manifest columns the engine reads, and the kind of Arrow type each accepts (checked at validation).
REQUIRED = {"id": "string", "prompt": "string"}
OPTIONAL = {
    "negative_prompt": "string",
    "seed": "integer",
    "width": "integer",
    "height": "integer",
    "num_inference_steps": "integer",
    "prior_num_inference_steps": "integer",
    "guidance_scale": "number",
    "prior_guidance_scale": "number",
    "task": "string",
    "strength": "number",
    "image_uri": "string",
    "image_bytes": "binary",
    "mask_uri": "string",
    "mask_bytes": "binary",
    "mix": "list",
    "hint_uri": "string",
    "hint_bytes": "binary",
}
ENGINE_INPUTS = {**REQUIRED, **OPTIONAL}
INPUT_KINDS = ("image", "mask", "hint")

MIX_ITEM = pa.struct([("text", pa.string()), ("image_uri", pa.string()), ("image_bytes", pa.binary()),
                      ("weight", pa.float64())])
# A mix item as written: the recipe, with the image's sha256 instead of its bytes.
MIX_ITEM_OUT = pa.struct([("text", pa.string()), ("image_uri", pa.string()), ("image_sha256", pa.string()),
                          ("weight", pa.float64())])

# The image column as Hugging Face `datasets` stores an `Image` feature: the encoded bytes, and a
# file name (the row's sample key and the format's extension, as in a webdataset shard). pyarrow
# readers take `table["image"].field("bytes")`; `datasets` decodes it to a PIL image because the
# schema's metadata says so (HF_METADATA).
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
# Only the image is described: `datasets.Features.from_arrow_schema` takes every other column's
# feature from its Arrow type, so the engine needs no `datasets` at run time and a pass-through
# column of any type needs no entry. The JSON is what `datasets.Features({"image":
# datasets.Image()}).arrow_schema.metadata` holds (tests/test_formats.py compares them).
HF_METADATA = {b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}}).encode()}
# Opt-in signals (output.columns), written after the engine's columns when asked.
SIGNAL_TYPES: dict[str, pa.DataType] = {
    "image_embeds": pa.list_(pa.float32()),  # (D,) the prior's CLIP image embedding
    "clip_score": pa.float32(),
    "sha256": pa.string(),
    "phash": pa.string(),
}

# The engine's output columns, in order. Parameters are the resolved values (row value or job
# default); URIs are written with credentials redacted; *_sha256 identify the input bytes used
# (inline or fetched); *_model identify the weights (source @ weights digest, see models.py);
# model_revision, engine_version and created_at say what made the row and when (below).
OUTPUT_TYPES: dict[str, pa.DataType] = {
    "id": pa.string(),
    "task": pa.string(),
    "prompt": pa.string(),
    "negative_prompt": pa.string(),
    "seed": pa.int64(),
    "width": pa.int64(),
    "height": pa.int64(),
    "num_inference_steps": pa.int64(),
    "guidance_scale": pa.float64(),
    "prior_num_inference_steps": pa.int64(),
    "prior_guidance_scale": pa.float64(),
    "strength": pa.float64(),
    "image_uri": pa.string(),
    "mask_uri": pa.string(),
    "hint_uri": pa.string(),
    "image_sha256": pa.string(),
    "mask_sha256": pa.string(),
    "hint_sha256": pa.string(),
    "mix": pa.list_(MIX_ITEM_OUT),
    "image": IMAGE_TYPE,
    "image_width": pa.int64(),
    "image_height": pa.int64(),
    "prior_model": pa.string(),
    "decoder_model": pa.string(),
    "depth_model": pa.string(),
    "model_revision": pa.string(),
    "engine_version": pa.string(),
    "created_at": pa.timestamp("us", tz="UTC"),
}
# The provenance columns. model_revision: one digest of every part's weights (the job's whole model:
# rows with equal values come from identical weights; identity.model_identity); engine_version: this
# package's version; created_at: when the last model stage finished the row's unit, the same for every
# row of a unit's attempt (pipelines/sink.py).

# Columns the stages add and drop on the way; a manifest column of the same name would be
# overwritten by them.
STAGE_COLUMNS = ("error_stage", "error_type", "error_message", "image_embeds", "negative_image_embeds", "latents",
                 "init_latents", "keep_mask", "hint_pixels", "prompt_embeds", "context_length", "prompt_tokens",
                 "negative_prompt_embeds", "negative_prompt_tokens")
# Internal bookkeeping columns start with "_" (see pipelines/sink.py): the prefix is reserved.
RESERVED_PREFIX = "_"
PASSTHROUGH_BLOB = "_passthrough"


@lru_cache(maxsize=1)
def engine_version() -> str:
    """The installed kandinsky-engine's version (the `engine_version` of every row)."""
    try:
        return metadata.version("kandinsky-engine")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def reserved_reason(name: str) -> str | None:
    """Why a manifest column cannot pass through under this name, or None if it can."""
    if name in ENGINE_INPUTS:
        return None  # the engine's own input: read, typed and written by the engine
    if name in OUTPUT_TYPES or name in STAGE_COLUMNS or name in SIGNAL_TYPES:
        return "is a column the engine writes; rename it in the manifest"
    if name.startswith(RESERVED_PREFIX):
        return f"starts with {RESERVED_PREFIX!r}, which is reserved for the engine's internal columns; rename it"
    return None


def passthrough_fields(manifest_schema: pa.Schema) -> list[pa.Field]:
    """Manifest columns that are not the engine's, in manifest order, with their manifest types."""
    return [f for f in manifest_schema if f.name not in ENGINE_INPUTS]


def output_schema(manifest_schema: pa.Schema, columns: list[str] = ()) -> pa.Schema:
    """The engine's columns, the signals asked for (`columns`: output.columns), the pass-through columns."""
    fields = [pa.field(name, type_) for name, type_ in OUTPUT_TYPES.items()]
    fields += [pa.field(name, SIGNAL_TYPES[name]) for name in columns]
    return pa.schema(fields + [f.with_nullable(True) for f in passthrough_fields(manifest_schema)], metadata=HF_METADATA)


def pack_passthrough(table: pa.Table, fields: list[pa.Field]) -> bytes:
    """The id and pass-through columns of `table` as one Arrow IPC stream, typed as in `fields`
    (a file of a directory manifest may lack a column: it is null there)."""
    columns = [table["id"].cast(pa.string())]
    for f in fields:
        columns.append(table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type))
    packed = pa.table(columns, schema=pa.schema([pa.field("id", pa.string())] + [f.with_nullable(True) for f in fields]))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, packed.schema) as writer:
        writer.write_table(packed)
    return sink.getvalue().to_pybytes()


def unpack_passthrough(blobs: list[bytes]) -> pa.Table:
    return pa.concat_tables([pa.ipc.open_stream(pa.py_buffer(b)).read_all() for b in blobs])
