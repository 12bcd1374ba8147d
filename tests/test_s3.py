"""Object storage: a whole job against a real S3 API (moto's server on loopback), as s3fs tests itself."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.run import run_job
from tests.conftest import KEY, SECRET, make_config
from tests.reference import decode

pytestmark = pytest.mark.ray

def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, format="PNG")
    return buf.getvalue()


def test_job_reads_and_writes_s3(ray_cluster, model_cache, s3):
    fs, options = s3
    fs.pipe("kandinsky/in/blue.png", png("blue"))
    rows = [
        {"id": "t2i", "prompt": "a cat", "task": "text2img", "image_uri": None},
        {"id": "s3-image", "prompt": "a dog", "task": "img2img", "image_uri": "s3://kandinsky/in/blue.png"},
        {"id": "s3-missing", "prompt": "x", "task": "img2img", "image_uri": "s3://kandinsky/in/nope.png"},
    ]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    fs.pipe("kandinsky/manifests/part-0.parquet", buf.getvalue())

    config = make_config(model_cache, "s3://kandinsky/manifests/", "s3://kandinsky/out",
                         defaults={"strength": 0.5, "num_inference_steps": 4})
    config = config.model_copy(update={"storage_options": options})
    summary = run_job(config)
    assert (summary["rows"], summary["failed_rows"]) == (2, 1)

    data = pq.read_table(fs.open("kandinsky/out/data/" + summary["shards"][0]["file"], "rb")).to_pylist()
    assert {r["id"] for r in data} == {"t2i", "s3-image"}
    assert all(decode(r["image"]).shape == (64, 64, 3) for r in data)
    errors = pq.read_table(fs.open("kandinsky/out/errors/" + summary["error_shards"][0]["file"], "rb")).to_pylist()
    assert errors[0]["id"] == "s3-missing" and "file not found: s3://kandinsky/in/nope.png" in errors[0]["message"]

    # The canary credentials are nowhere: not in the report, the metadata or the errors.
    report = fs.cat("kandinsky/out/_SUCCESS.json").decode()
    assert json.loads(report)["rows"] == 2
    everything = report + json.dumps(summary) + json.dumps(errors) + str([{k: v for k, v in r.items() if k != "image"}
                                                                           for r in data]) + repr(config)
    assert KEY not in everything and SECRET not in everything
    assert not [p for p in fs.find("kandinsky/out") if "/.tmp-" in p]  # no partial shards left behind


def test_unreadable_s3_manifest_fails_fast_without_leaking(model_cache, s3):
    from kandinsky_engine.manifest import ManifestError, validate_manifest

    fs, options = s3
    fs.pipe("kandinsky/bad/part-0.parquet", b"not parquet")
    config = make_config(model_cache, "s3://kandinsky/bad/", "s3://kandinsky/out-bad")
    config = config.model_copy(update={"storage_options": options})
    with pytest.raises(ManifestError, match="part-0.parquet: cannot read as Parquet") as err:
        validate_manifest(config)
    assert SECRET not in str(err.value) and KEY not in str(err.value)
