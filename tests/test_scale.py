"""Scale: a manifest prefix that grows between runs, and files that change or are still being
written (the lease, one run at a time per output: tests/test_lease.py)."""

from __future__ import annotations



import pyarrow.parquet as pq
import pytest

from kandinsky_engine.jobs.run import ManifestChanged, run_job
from kandinsky_engine.jobs.verify import verify
from tests.conftest import make_config, put_manifest, write_manifest


pytestmark = pytest.mark.ray

UNIT = 4


def rows(name: str, n: int) -> list[dict]:
    return [{"id": f"{name}-{i}", "prompt": f"a kite over {name}, {i}"} for i in range(n)]


def test_growing_manifest_prefix_on_s3(ray_cluster, model_cache, s3):
    """2 files, then 3, then 5: each run computes only the new files' units, nothing committed is
    touched, and the output equals one run over the 5 files, byte for byte; a file rewritten under
    its name is refused, naming it."""
    fs, options = s3
    sizes = {"a": 6, "b": 3, "c": 5, "d": 4, "e": 7}

    def config(out: str):
        c = make_config(model_cache, "s3://kandinsky/grow/manifests/", out, input={"rows_per_block": UNIT})
        return c.model_copy(update={"storage_options": options})

    computed = []
    for batch in (("a", "b"), ("c",), ("d", "e")):
        for name in batch:
            put_manifest(fs, f"kandinsky/grow/manifests/{name}.parquet", rows(name, sizes[name]))
        before = {k: fs.info(k)["ETag"] for k in fs.find("kandinsky/grow/out/data")} if computed else {}
        summary = run_job(config("s3://kandinsky/grow/out"))
        computed.append(summary["rows_computed"])
        fs.invalidate_cache()
        after = {k: fs.info(k)["ETag"] for k in fs.find("kandinsky/grow/out/data")}
        assert {k: after[k] for k in before} == before  # committed shards untouched
        assert summary["complete"] and [f["file"] for f in summary["files"]] == sorted(f"{n}.parquet" for n in sizes
                                                                                       if n <= batch[-1])
    assert computed == [9, 5, 11]
    assert verify("s3://kandinsky/grow/out", config=config("s3://kandinsky/grow/out")).ok

    single = run_job(config("s3://kandinsky/grow/single"))
    assert single["rows"] == sum(sizes.values())
    grown = {s["file"] for s in run_job(config("s3://kandinsky/grow/out"))["shards"]}
    assert grown == {s["file"] for s in single["shards"]}  # the same shards, row for row (names carry the rows' digest)
    read = lambda out: pq.read_table(f"kandinsky/grow/{out}/data", filesystem=fs).drop_columns(["created_at"])  # noqa: E731
    assert read("out").sort_by("id").equals(read("single").sort_by("id"))  # every value but when it was made

    put_manifest(fs, "kandinsky/grow/manifests/c.parquet", rows("c", sizes["c"])[::-1])  # same ids, new order
    with pytest.raises(ManifestChanged, match=r"c\.parquet \(2 committed unit\(s\)\)"):
        run_job(config("s3://kandinsky/grow/out"))


def test_a_file_still_being_written_is_never_half_read(ray_cluster, model_cache, tmp_path):
    """The contract: writers put files in place whole (object stores do; on disk, write to a name the
    listing skips, `_name` or `.name`, then rename). A truncated `*.parquet` is refused, named."""
    folder = tmp_path / "manifests"
    write_manifest(folder / "a.parquet", rows("a", 4))
    write_manifest(folder / "_incoming.parquet", rows("b", 4))  # being written: skipped
    (folder / ".c.parquet.partial").write_bytes(b"PAR1 half")
    config = make_config(model_cache, str(folder), str(tmp_path / "out"), input={"rows_per_block": UNIT})
    summary = run_job(config)
    assert (summary["rows"], [f["file"] for f in summary["files"]]) == (4, ["a.parquet"])
    (folder / "d.parquet").write_bytes((folder / "a.parquet").read_bytes()[:60])  # a torn upload
    with pytest.raises(ValueError, match=r"d\.parquet: cannot read as Parquet"):
        run_job(config)
