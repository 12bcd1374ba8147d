"""Units of work: consecutive manifest rows that are run, committed and resumed together.

Unit n is manifest rows [n·R, (n+1)·R) in read order (R = input.rows_per_block), the same in
every run. Each unit carries a digest of its rows' content (every column, the id included), and
every shard committed for a unit carries that digest in its name. A rerun whose manifest was
rewritten (rows reordered, a prompt changed under the same id, a row replaced) therefore sees
that a committed unit was computed from other rows, and refuses to mix them (or, when asked,
recomputes just those units); it never counts them as done.
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import json
from dataclasses import dataclass

DIGEST_CHARS = 16  # 64 bits of sha256: enough to tell two versions of one unit apart


@dataclass
class Unit:
    index: int
    ids: list[str]
    digest: str  # DIGEST_CHARS hex chars over the unit's rows, in order


def _canonical(value):
    """JSON stand-ins for what `to_pylist` yields beyond JSON's types; bytes by their sha256."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": hashlib.sha256(value).hexdigest()}
    if isinstance(value, (datetime.date, datetime.time, datetime.timedelta, decimal.Decimal)):
        return {"$" + type(value).__name__: str(value)}
    raise TypeError(f"cannot digest a manifest value of type {type(value).__name__}")


def row_bytes(row: dict) -> bytes:
    """A row's canonical encoding: sorted keys, floats by their exact repr, NaN kept distinct from null."""
    return json.dumps(row, sort_keys=True, default=_canonical, ensure_ascii=False, allow_nan=True).encode()


class UnitDigests:
    """Feeds rows in manifest order; `digests()` returns one digest per unit of `rows_per_block` rows."""

    def __init__(self, rows_per_block: int):
        self.rows_per_block = rows_per_block
        self._done: list[str] = []
        self._current = hashlib.sha256()
        self._rows = 0

    def add(self, row: dict) -> None:
        encoded = row_bytes(row)
        # Length-prefixed, so that row boundaries are part of the digest.
        self._current.update(len(encoded).to_bytes(8, "big") + encoded)
        self._rows += 1
        if self._rows == self.rows_per_block:
            self._close()

    def _close(self) -> None:
        self._done.append(self._current.hexdigest()[:DIGEST_CHARS])
        self._current, self._rows = hashlib.sha256(), 0

    def digests(self) -> list[str]:
        if self._rows:
            self._close()
        return self._done


def cut_units(ids: list[str], digests: list[str], rows_per_block: int) -> list[Unit]:
    """Every unit of the manifest, in order."""
    starts = range(0, len(ids), rows_per_block)
    if len(digests) != len(starts):
        raise ValueError(f"{len(digests)} unit digests for {len(starts)} units")
    return [Unit(n, ids[start:start + rows_per_block], digests[n]) for n, start in enumerate(starts)]


def in_scope(units: list[Unit], limit: int | None) -> list[Unit]:
    """The units a run covers: all of them, or with --limit N the first N rows rounded up to whole
    units, so that a smoke run's units are the full run's and the full run resumes it."""
    if limit is None:
        return units
    if limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    covered, scope = 0, []
    for unit in units:
        if covered >= limit:
            break
        scope.append(unit)
        covered += len(unit.ids)
    return scope
