"""Rows for the report's contact sheet: a bounded sample from a few shards spread over the job.

A million-row job must give a report that builds in seconds and loads in one: at most `max_rows`
rows, read from at most `max_shards` data shards (16), each only as far as its share of rows. Shards are chosen from `_index.parquet` (a few
of its 64k-record row groups, evenly spaced: never the whole index), or, before any run finished
(no index yet), from a listing of a few of data/'s per-file folders.

Shards are read by their suffix through SHARD_READERS (Parquet, WebDataset tar). Images are read through `image_bytes` only.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from kandinsky_engine.pipelines.output import DATA, INDEX

SHOWN = ("id", "prompt", "seed", "task", "clip_score", "image_width", "image_height")


def image_bytes(column) -> list[bytes | None]:
    """The encoded images of an `image` column: plain binary, or a struct with a `bytes` field
    (Hugging Face datasets' Image feature, {bytes, path})."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return column.to_pylist()


def read_parquet_rows(fs, path: str, limit: int) -> list[dict]:
    """The first `limit` rows of a Parquet data shard: the shown columns and `image` (encoded bytes).
    One batch of an iterator: pages are read as far as it needs, not the whole shard's images."""
    with fs.open(path, "rb") as f:
        shard = pq.ParquetFile(f)
        names = shard.schema_arrow.names
        batch = next(shard.iter_batches(batch_size=limit, columns=[c for c in (*SHOWN, "image") if c in names]), None)
        if batch is None:
            return []
        table = pa.Table.from_batches([batch])
    rows = table.drop_columns(["image"]).to_pylist() if "image" in names else table.to_pylist()
    images = image_bytes(table["image"]) if "image" in names else [None] * table.num_rows
    return [{**row, "image": image} for row, image in zip(rows, images)]


def read_tar_rows(fs, path: str, limit: int) -> list[dict]:
    """The first `limit` samples of a WebDataset data shard (pipelines/shards.py): each `<key>.json`
    and the image member that precedes it (the `.txt` caption between them is skipped). The tar is
    streamed: reading stops after `limit` samples."""
    import json
    import tarfile

    from kandinsky_engine.pipelines.shards import EXTENSIONS

    rows, image = [], None
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            ext = member.name.rsplit(".", 1)[-1]
            if ext in EXTENSIONS.values():
                image = tar.extractfile(member).read()
            if ext != "json":
                continue
            row = json.loads(tar.extractfile(member).read())
            rows.append({**{k: row.get(k) for k in SHOWN}, "image": image})
            image = None
            if len(rows) >= limit:
                break
    return rows


SHARD_READERS = {".parquet": read_parquet_rows, ".tar": read_tar_rows}


def _spread(items: list, count: int) -> list:
    """`count` items evenly spaced over `items` (all of them if fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[(2 * i + 1) * len(items) // (2 * count)] for i in range(count)]


def pick_shards(fs, root: str, count: int) -> list[str]:
    """Up to `count` data shards spread over the job, as paths relative to `root`."""
    try:
        with fs.open(f"{root}/{INDEX}", "rb") as f:
            index = pq.ParquetFile(f)
            groups = _spread(list(range(index.num_row_groups)), count)
            files = [name for g in groups for name in index.read_row_group(g, columns=["file"])["file"].to_pylist()
                     if name.startswith(f"{DATA}/")]
        if files:
            return _spread(files, count)
    except Exception:  # missing (no run finished yet) or damaged: the folders are listed instead
        pass
    # No index yet (the first run is running, or was killed): list a few per-file folders.
    try:
        folders = sorted(fs.ls(f"{root}/{DATA}", detail=False))
    except FileNotFoundError:
        return []
    files = []
    for folder in _spread(folders, count):
        found = sorted(name for name in fs.ls(folder, detail=False) if "." in name.rsplit("/", 1)[-1])
        files += [name[len(root) + 1:] for name in _spread(found, max(1, count // len(folders) or 1))]
    return _spread(files, count)


def sample_rows(fs, root: str, max_rows: int = 200, max_shards: int = 16) -> list[dict]:
    """Up to `max_rows` rows (shown columns, `image` bytes and their `shard`) from up to `max_shards`
    data shards spread over the job."""
    shards = pick_shards(fs, root, max_shards)
    rows: list[dict] = []
    for i, shard in enumerate(shards):
        reader = SHARD_READERS.get("." + shard.rsplit(".", 1)[-1])
        if reader is None:
            continue
        share = -(-(max_rows - len(rows)) // (len(shards) - i))  # what is left, over the shards left
        try:
            rows += [{**row, "shard": shard} for row in reader(fs, f"{root}/{shard}", share)]
        except Exception:  # a damaged or vanished shard: `verify` names it; the sheet shows the others
            continue
    return rows[:max_rows]
