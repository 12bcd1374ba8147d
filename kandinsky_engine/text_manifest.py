"""CSV, TSV and JSON Lines manifests: frozen into Parquet, so that units stay stable.

Exactly-once needs a manifest's units (row ranges of one file) to mean the same rows on every run,
and to know when they no longer do. A text file has no footer to plan from and is slow to seek in,
so the job reads it once, streaming (pyarrow's CSV and JSON readers, one block at a time, into a
Parquet writer: memory stays flat in the file's size), into a Parquet copy named by the source's
identity (the sha256 of its bytes on disk, its ETag on object stores), and runs from the copy:

- the copy is made in `model.cache_dir/manifests/` on the machine that plans the job, and once
  the output is known to be usable, copied to `OUTPUT/_manifests/`, where every worker reads it;
- units are named by the source's path and identity, as a Parquet file's are: a source changed
  since its units were committed is refused (or recomputed) like a rewritten Parquet file;
- the same source is converted once: the copy's name is its identity.

Column types: the engine's own columns get theirs (`id`, `prompt`, URIs as text, `seed`, sizes and
steps as integers, guidance and strength as numbers); any other column is inferred from the
file's first block. An empty CSV cell is null. JSON Lines may also hold `mix` lists.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import copy_file, ensure_dir, is_local, url_to_fs

SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".ndjson": "json"}
MANIFEST_SUFFIXES = (".parquet", *SUFFIXES)
FROZEN = "_manifests"  # under the output
# The engine's columns, with the types a text file cannot state.
TYPES = {**{c: pa.string() for c in ("id", "prompt", "negative_prompt", "task", "image_uri", "mask_uri", "hint_uri")},
         **{c: pa.int64() for c in ("seed", "width", "height", "num_inference_steps", "prior_num_inference_steps")},
         **{c: pa.float64() for c in ("guidance_scale", "prior_guidance_scale", "strength")}}
BLOCK_BYTES = 4 << 20  # text read per block: the most the conversion holds at once


def is_text(name: str) -> bool:
    return PurePosixPath(name.split("?", 1)[0]).suffix.lower() in SUFFIXES


def frozen_name(relpath: str, identity: str) -> str:
    """The copy's file name: readable, and unique per source path and content."""
    from .units import file_key

    return f"{file_key(relpath)}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.parquet"


def freeze(fs, name: str, relpath: str, identity: str, cache_dir: str) -> str:
    """The local Parquet copy of text manifest `name` (made once per identity)."""
    target = Path(cache_dir).expanduser() / "manifests" / frozen_name(relpath, identity)
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp-{os.getpid()}")
    kind = SUFFIXES[PurePosixPath(name.split("?", 1)[0]).suffix.lower()]
    try:
        with fs.open(name, "rb") as source:
            reader = _reader(source, kind)
            with pq.ParquetWriter(tmp, reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"cannot read as {kind.upper()}: {str(exc).splitlines()[0]}") from None
    os.replace(tmp, target)
    return str(target)


def _reader(source, kind: str):
    if kind == "json":
        from pyarrow import json

        return json.open_json(source, read_options=json.ReadOptions(block_size=BLOCK_BYTES),
                              parse_options=json.ParseOptions(explicit_schema=pa.schema(TYPES.items()),
                                                              unexpected_field_behavior="infer"))
    from pyarrow import csv

    return csv.open_csv(source, read_options=csv.ReadOptions(block_size=BLOCK_BYTES),
                        parse_options=csv.ParseOptions(delimiter="\t" if kind == "tsv" else ","),
                        convert_options=csv.ConvertOptions(column_types=TYPES, strings_can_be_null=True))


def publish(files: list, output: str, storage_options: dict | None) -> list:
    """`files` (ManifestFile) with every frozen copy copied to OUTPUT/_manifests/ (once: the name is
    the content) and its path pointing there, so that every worker of a cluster can read it."""
    import dataclasses

    fs, root = url_to_fs(output.rstrip("/"), storage_options)
    published = []
    for file in files:
        if not file.frozen:
            published.append(file)
            continue
        target = f"{root}/{FROZEN}/{Path(file.path).name}"
        if not fs.exists(target):
            ensure_dir(fs, f"{root}/{FROZEN}")
            if is_local(fs):
                copy_file(fs, file.path, target)  # appears whole: a temporary name, then a rename
            else:
                fs.put_file(file.path, target)  # one PUT: the object appears whole
        url = fs.unstrip_protocol(target) if "://" in output else target
        published.append(dataclasses.replace(file, path=url, stamp=_stamp(fs, target)))
    return published


def _stamp(fs, path: str) -> tuple:
    from .identity import file_stamp

    return file_stamp(fs, path)
