"""Cloud Storage: gs:// through gcsfs (the image's `gcs` extra) against an emulator of its JSON API on
loopback, as tests/test_s3.py does with moto: the exact-path primitives, and a whole job that reads
its manifest and an input image from gs:// and writes and resumes its output there."""

from __future__ import annotations

import re

import pyarrow.parquet as pq
import pytest

from kandinsky_engine.jobs.run import run_job
from kandinsky_engine.jobs.verify import verify
from kandinsky_engine.storage import copy_file, move_file, remove_tree, url_to_fs
from tests.conftest import make_config, png, put_manifest
from tests.reference import decode


def test_options_reach_gcsfs_and_paths_stay_exact(gcs):
    """storage_options["gs"] reach the filesystem of gs:// URLs; deletes and moves act on the names
    given, never on what a glob in them would match."""
    fs, options = gcs
    job_fs, path = url_to_fs("gs://kandinsky/exact/out", options)
    assert "gs" in job_fs.protocol and path == "kandinsky/exact/out"
    for name in ("exact/out/a[1]/x.bin", "exact/out/a1/x.bin", "exact/out/a*/y.bin"):
        fs.pipe(f"kandinsky/{name}", name.encode())
    assert remove_tree(job_fs, "kandinsky/exact/out/a[1]") == 1
    move_file(job_fs, "kandinsky/exact/out/a*/y.bin", "kandinsky/exact/out/moved/y.bin")
    copy_file(job_fs, "kandinsky/exact/out/a1/x.bin", "kandinsky/exact/out/copied/x.bin")
    fs.invalidate_cache()
    assert sorted(fs.find("kandinsky/exact")) == [
        "kandinsky/exact/out/a1/x.bin", "kandinsky/exact/out/copied/x.bin", "kandinsky/exact/out/moved/y.bin"]
    assert fs.cat("kandinsky/exact/out/moved/y.bin") == b"exact/out/a*/y.bin"


def test_gs_without_gcsfs_names_the_extra(monkeypatch):
    import sys

    import fsspec  # noqa: F401 (fsspec.registry, the attribute, is a read-only view of the module's _registry)

    monkeypatch.setitem(sys.modules, "gcsfs", None)  # not installed: importing it fails
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "gs", raising=False)
    with pytest.raises(RuntimeError, match=r"gs://b/out: gs:// paths need gcsfs: pip install 'kandinsky-engine\[gcs\]'"):
        url_to_fs("gs://b/out")


@pytest.mark.ray
def test_job_reads_writes_and_resumes_on_gcs(ray_cluster, model_cache, gcs):
    fs, options = gcs
    fs.pipe("kandinsky/in/blue.png", png("blue"))
    rows = [{"id": f"r{i}", "prompt": f"a boat {i}"} for i in range(5)]
    rows += [{"id": "gs-image", "prompt": "a dog", "task": "img2img", "image_uri": "gs://kandinsky/in/blue.png",
              "strength": 0.5},
             {"id": "gs-missing", "prompt": "x", "task": "img2img", "image_uri": "gs://kandinsky/in/nope.png",
              "strength": 0.5}]
    put_manifest(fs, "kandinsky/manifests/part-0.parquet", rows)
    config = make_config(model_cache, "gs://kandinsky/manifests/", "gs://kandinsky/out",
                         input={"rows_per_block": 4, "allowed_uri_prefixes": ["gs://kandinsky/in/"]})
    config = config.model_copy(update={"storage_options": options})
    first = run_job(config)
    assert (first["rows"], first["failed_rows"]) == (6, 1)
    fs.invalidate_cache()
    shards = sorted(k for k in fs.find("kandinsky/out/data") if k.endswith(".parquet"))
    assert len(shards) == 2 and all(re.search(r"/part-\d{12}-[0-9a-f]{16}-a1\.parquet$", k) for k in shards)
    data = [r for k in shards for r in pq.read_table(fs.open(k, "rb")).to_pylist()]
    assert sorted(r["id"] for r in data) == sorted(r["id"] for r in rows if r["id"] != "gs-missing")
    assert all(decode(r["image"]["bytes"]).shape == (64, 64, 3) for r in data)
    errors = [k for k in fs.find("kandinsky/out/errors") if k.endswith(".parquet")]
    assert "file not found: gs://kandinsky/in/nope.png" in pq.read_table(fs.open(errors[0], "rb"))["message"][0].as_py()
    assert not fs.exists("kandinsky/out/_LEASE.json")  # given back at the end

    # A killed run's leftovers: one shard and the success marker gone. The rerun recomputes that
    # unit's rows (and tries the failed row again), and the retry after the missing input appears
    # commits it: every row exactly once.
    lost = pq.read_table(fs.open(shards[0], "rb")).num_rows
    fs.rm_file(shards[0])
    fs.rm_file("kandinsky/out/_SUCCESS.json")
    second = run_job(config)
    assert (second["rows"], second["failed_rows"], second["rows_skipped"], second["rows_computed"]) == (
        6, 1, 6 - lost, lost + 1)
    fs.pipe("kandinsky/in/nope.png", png("green"))
    third = run_job(config)
    assert (third["rows"], third["failed_rows"], third["rows_retried"]) == (7, 0, 1)
    fs.invalidate_cache()
    ids = [i for k in fs.find("kandinsky/out/data") if k.endswith(".parquet")
           for i in pq.read_table(fs.open(k, "rb")).column("id").to_pylist()]
    assert sorted(ids) == sorted(r["id"] for r in rows)
    assert verify("gs://kandinsky/out", config=config).ok
