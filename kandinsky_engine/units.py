"""Units of work: row ranges of one manifest file, run, committed and resumed together.

A unit is rows [start, stop) of one manifest file, stop - start = input.rows_per_block except at
the end of the file. It is named by the file (`key`, from its path relative to the manifest
root) and `start`, so units depend on nothing but their own file: a new file in a growing
manifest adds units and changes none, and reading needs no global order. Its `digest` covers the
file's path, the file's identity (ETag on object stores, sha256 of the bytes on disk) and the
range, and every shard committed for the unit carries it in its name: a file rewritten since its
units were committed (other rows, another order, a prompt changed under the same id) shows as
committed shards with another digest, and is refused (or recomputed when asked), never mixed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

DIGEST_CHARS = 16  # 64 bits of sha256: enough to tell two versions of one unit apart


@dataclass(frozen=True)
class Unit:
    file: str  # path relative to the manifest root
    key: str  # the file's folder name in the output (file_key)
    start: int  # first row in the file
    stop: int  # one past the last row
    digest: str

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        """`key/start`: how logs, errors and the writer name the unit."""
        return f"{self.key}/{self.start}"


def file_key(relpath: str) -> str:
    """A file's folder name in the output: readable (its name, reduced to safe characters) and
    unique (a hash of the whole relative path), so that no manifest path can form an output path."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", relpath.rsplit("/", 1)[-1].removesuffix(".parquet")).strip("-")[:40]
    return f"{stem or 'file'}-{hashlib.sha256(relpath.encode()).hexdigest()[:12]}"


def unit_digest(relpath: str, identity: str, start: int, stop: int) -> str:
    return hashlib.sha256(f"{relpath}\0{identity}\0{start}\0{stop}".encode()).hexdigest()[:DIGEST_CHARS]


def file_units(relpath: str, identity: str, num_rows: int, rows_per_block: int) -> list[Unit]:
    key = file_key(relpath)
    return [Unit(relpath, key, start, min(start + rows_per_block, num_rows),
                 unit_digest(relpath, identity, start, min(start + rows_per_block, num_rows)))
            for start in range(0, num_rows, rows_per_block)]


def limit_stops(files: list, limit: int | None, rows_per_block: int) -> list[int]:
    """Rows of each file that the run covers: all, or with --limit N the first N rows in manifest
    order rounded up to whole units (so that a full run resumes a smoke run's units)."""
    stops, left = [], limit
    for file in files:
        if left is None:
            stops.append(file.num_rows)
            continue
        stop = min(file.num_rows, -(-left // rows_per_block) * rows_per_block) if left > 0 else 0
        stops.append(stop)
        left -= stop
    return stops
