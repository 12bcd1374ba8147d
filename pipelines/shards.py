"""Data shard formats: how one unit's rows become one file of data/, and how its ids are read back.

Two peers with one interface, chosen by `output.format` when writing and by the file's extension
when reading (so verify and resume need no config to read a shard):

- `ParquetShards`: the unit's table as one Parquet file, the `image` column a Hugging Face Image
  struct{bytes, path} (kandinsky_engine/columns.py);
- `TarShards`: a WebDataset shard, one tar per unit; per row `<key>.<ext>` (the encoded image),
  `<key>.txt` (the prompt, UTF-8: the caption member img2dataset writes) and `<key>.json` (every
  other column of the Parquet row, the exact id included). Every json has every column of the
  job's output schema, null included, and each column one JSON type in every shard: NaN and
  infinite floats are null (strict JSON has no such numbers), binary base64, times ISO 8601 and
  decimals strings (`json_type`), so readers that infer types from the first samples see the same
  keys and types as any later ones.

A sample key must be a tar member name that webdataset and `datasets` split correctly (they cut
the basename at its first dot), that no extraction turns into a path outside its folder, and that
is unique per id even where ids differ only in case or in characters a sanitizer replaces. So it
is a readable prefix of the id (ASCII letters, digits, '_' and '-'; at most 48 characters) and
16 hex digits of the id's sha256: `../x` -> `x-<hash>`, `.` -> `<hash>`. The tar is written with
fixed member metadata (mtime 0, uid/gid 0, mode 0644, no user names) so that the same rows give the
same bytes (a row's `created_at` aside, see pipelines/output.py).
"""

from __future__ import annotations

import base64
import datetime
import decimal
import hashlib
import io
import json
import math
import re
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

KEY_PREFIX_CHARS = 48  # a readable prefix; uniqueness comes from the hash
UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
# Extensions readers know: webdataset's and `datasets`' decoders both take png, jpeg and webp.
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def sample_key(row_id: str) -> str:
    """The row's sample key: a sanitized prefix of the id and a short hash of the exact id."""
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    prefix = UNSAFE.sub("_", row_id).strip("_-")[:KEY_PREFIX_CHARS].rstrip("_-")
    return f"{prefix}-{digest}" if prefix else digest


def image_path(row_id: str, image_format: str) -> str:
    """The image's file name: the tar member's name, and the `path` of the Parquet image struct."""
    return f"{sample_key(row_id)}.{EXTENSIONS[image_format]}"


class ParquetShards:
    ext = "parquet"

    def encode(self, table: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return sink.getvalue().to_pybytes()

    def ids(self, f) -> list:
        """The id column, from an open file (only the footer and that column are read)."""
        return pq.ParquetFile(f).read(columns=["id"])["id"].to_pylist()

    def decode(self, payload: bytes) -> tuple[int, list, object]:
        """(rows, ids, schema) of a whole shard; every page must decode."""
        table = pq.read_table(pa.BufferReader(payload))
        return table.num_rows, table["id"].to_pylist(), table.schema

    def schema_problem(self, found: pa.Schema, want: pa.Schema) -> str | None:
        if found.equals(want, check_metadata=False):
            return None
        got = {f.name: str(f.type) for f in found}
        expected = {f.name: str(f.type) for f in want}
        diff = [f"{n}: {got.get(n, 'absent')} (expected {expected.get(n, 'absent')})"
                for n in dict.fromkeys([*expected, *got]) if got.get(n) != expected.get(n)]
        return "; ".join(diff[:5]) or "column order"


class TarShards:
    ext = "tar"

    def encode(self, table: pa.Table) -> bytes:
        buf = io.BytesIO()
        keys = set()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for row in table.to_pylist():
                image = row.pop("image")
                key, ext = image["path"].split(".", 1)  # image_path(): the sample key, the extension
                if key in keys:  # 64 bits of sha256 agreeing for two ids of one unit: never silently
                    raise RuntimeError(f"sample key {key} of id {row['id']!r} is taken by another id of its unit")
                keys.add(key)
                _add(tar, f"{key}.{ext}", image["bytes"])
                _add(tar, f"{key}.txt", (row.get("prompt") or "").encode("utf-8", "surrogatepass"))
                _add(tar, f"{key}.json", json.dumps(_finite(row), default=_json_value, allow_nan=False).encode())
        return buf.getvalue()

    def ids(self, f) -> list:
        return self.scan(f)[0]

    def scan(self, f) -> tuple[list, list]:
        """(ids, layout) from an open file, reading only the json members: the tar reader seeks past
        the images, so on S3 this fetches little more than the metadata. The layout is each
        sample's column names and the extensions of its other members."""
        tar = tarfile.open(fileobj=f, mode="r:")
        rows = list(_metadata(tar))
        members: dict[str, set] = {}
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            members.setdefault(key, set()).add(ext)
        return [row["id"] for row in rows], [(list(row), members.get(sample_key(row["id"]), set()) - {"json"})
                                             for row in rows]

    def decode(self, payload: bytes) -> tuple[int, list, object]:
        """(rows, ids, layout) of a whole shard, every member read."""
        tar = tarfile.open(fileobj=io.BytesIO(payload), mode="r:")
        for member in tar.getmembers():
            tar.extractfile(member).read()
        ids, layout = self.scan(io.BytesIO(payload))
        return len(ids), ids, layout

    def schema_problem(self, found: list, want: pa.Schema) -> str | None:
        expected = [n for n in want.names if n != "image"]
        for columns, others in found:
            if columns != expected:
                missing, extra = set(expected) - set(columns), set(columns) - set(expected)
                return f"json members hold other columns (missing {sorted(missing)}, extra {sorted(extra)})"
            if not others & set(EXTENSIONS.values()):
                return "a sample has no image member"
            if "txt" not in others:
                return "a sample has no .txt caption member"
        return None


FORMATS = {"parquet": ParquetShards(), "webdataset": TarShards()}
BY_EXT = {f.ext: f for f in FORMATS.values()}


def format_of(file: str):
    """The format of a data shard, by its name's extension."""
    return BY_EXT[file.rsplit(".", 1)[-1]]


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def _metadata(tar: tarfile.TarFile):
    for member in tar:
        if member.name.endswith(".json"):
            yield json.loads(tar.extractfile(member).read())


def _finite(value):
    """`value` with every NaN or infinite float (pass-through columns, float signals) as None:
    JSON has no such numbers, and Python's `NaN` literal is refused by most JSON parsers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def json_type(type_: pa.DataType) -> pa.DataType:
    """The Arrow type a column has once its values went through the json member and back (what a
    reader parsing it sees): `_json_value`'s strings for binary, times and decimals, the same type
    for the rest, nested types member by member."""
    if pa.types.is_struct(type_):
        return pa.struct([f.with_type(json_type(f.type)) for f in type_])
    if pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_fixed_size_list(type_):
        return pa.list_(json_type(type_.value_type))
    if pa.types.is_dictionary(type_):
        return json_type(type_.value_type)
    if (pa.types.is_binary(type_) or pa.types.is_large_binary(type_) or pa.types.is_fixed_size_binary(type_)
            or pa.types.is_large_string(type_) or pa.types.is_temporal(type_) or pa.types.is_decimal(type_)):
        return pa.string()
    return type_


def _json_value(value):
    """JSON for the Arrow values json cannot write: binary as base64, dates and times ISO 8601,
    decimals as strings (exact)."""
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, (datetime.date, datetime.time, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, datetime.timedelta)):
        return str(value)
    raise TypeError(f"column value of type {type(value).__name__} has no JSON form")
