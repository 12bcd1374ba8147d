"""Object storage: a whole job against a real S3 API (moto's server on loopback), as s3fs tests itself."""

from __future__ import annotations


import json
import logging
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kandinsky_engine.jobs.run import run_job
from kandinsky_engine.manifest import validate_manifest
from tests.conftest import KEY, SECRET, make_config, png, put_manifest

from tests.reference import decode

pytestmark = pytest.mark.ray

# The documented output layout (pipelines/output.py), relative to the output root.
LAYOUT = re.compile(r"(data/[\w-]+/part-\d{12}-[0-9a-f]{16}-a\d+\.parquet|errors/[\w-]+/part-\d{12}-[0-9a-f]{16}\.parquet"
                    r"|_RUN\.json|_SUCCESS\.json|_index\.parquet|_files\.parquet|_runs/[0-9a-f]+\.(json|parquet|progress)"
                    r"|README\.md|shards\.txt)")  # the dataset card and the shard list
CANARIES = (KEY, SECRET)




def leaks(text: str) -> list[str]:
    return [c for c in CANARIES if c in text]


def test_job_reads_and_writes_s3(ray_cluster, model_cache, s3, caplog, capfd):
    fs, options = s3
    fs.pipe("kandinsky/in/blue.png", png("blue"))
    rows = [
        {"id": "t2i", "prompt": "a cat", "task": "text2img", "image_uri": None},
        {"id": "s3-image", "prompt": "a dog", "task": "img2img", "image_uri": "s3://kandinsky/in/blue.png"},
        {"id": "s3-missing", "prompt": "x", "task": "img2img", "image_uri": "s3://kandinsky/in/nope.png"},
    ]
    put_manifest(fs, "kandinsky/manifests/part-0.parquet", rows)

    config = make_config(model_cache, "s3://kandinsky/manifests/", "s3://kandinsky/out",
                         defaults={"strength": 0.5, "num_inference_steps": 4},
                         input={"allowed_uri_prefixes": ["s3://kandinsky/in/"]})
    config = config.model_copy(update={"storage_options": options})
    caplog.set_level(logging.INFO)  # the job's own log level (kandinsky_engine.jobs.cli); DEBUG is botocore's wire dump
    summary = run_job(config)
    assert (summary["rows"], summary["failed_rows"]) == (2, 1)
    unit = validate_manifest(config).units(config.rows_per_block())[0][0]  # shard names carry the unit's digest

    # Shard records name files relative to the output root.
    assert [s["file"] for s in summary["shards"]] == [f"data/{unit.key}/part-000000000000-{unit.digest}-a1.parquet"]
    assert [s["file"] for s in summary["error_shards"]] == [f"errors/{unit.key}/part-000000000000-{unit.digest}.parquet"]
    data = pq.read_table(fs.open("kandinsky/out/" + summary["shards"][0]["file"], "rb")).to_pylist()
    assert {r["id"] for r in data} == {"t2i", "s3-image"}
    assert all(decode(r["image"]["bytes"]).shape == (64, 64, 3) for r in data)
    errors = pq.read_table(fs.open("kandinsky/out/" + summary["error_shards"][0]["file"], "rb")).to_pylist()
    assert errors[0]["id"] == "s3-missing" and "file not found: s3://kandinsky/in/nope.png" in errors[0]["message"]
    assert errors[0]["attempt"] == 1 and errors[0]["stage"] == "fetch_inputs"

    # Every object under the output prefix is in the documented layout: no _tmp/ left behind.
    fs.invalidate_cache()
    keys = sorted(fs.find("kandinsky/out"))
    relative = [k.removeprefix("kandinsky/out/") for k in keys]
    assert all(LAYOUT.fullmatch(k) for k in relative), relative
    assert {"_RUN.json", "_SUCCESS.json"} <= set(relative) and any(k.startswith("_runs/") for k in relative)
    report = json.loads(fs.cat("kandinsky/out/_SUCCESS.json"))
    assert report["rows"] == 2 and "storage_options" not in report["config"]

    # The canary credentials are in no object under the output prefix: raw bytes (the JSON files),
    # and every non-image cell of the shards (Parquet may compress strings, so decoded too).
    for key in keys:
        payload = fs.cat_file(key)
        assert not [c for c in CANARIES if c.encode() in payload], key
        if key.endswith(".parquet"):
            table = pq.read_table(pa.BufferReader(payload))
            cells = table.drop_columns([c for c in ("image",) if c in table.column_names]).to_pylist()
            assert not leaks(repr(cells) + repr(table.schema.metadata)), key
    assert not leaks(json.dumps(summary) + repr(config))

    # Nor in the job's log output: the driver's log records and whatever reached stdout/stderr...
    out, err = capfd.readouterr()
    assert caplog.records and not leaks("\n".join(r.getMessage() for r in caplog.records) + caplog.text)
    assert not leaks(out + err)
    # ...nor in the Ray workers' logs (the test cluster does not forward them to the driver)...
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and any(c.encode() in p.read_bytes() for c in CANARIES)]
    assert leaked == []
    # ...nor in Ray's runtime environment or the workers' environment variables: credentials reach
    # the stages as pickled arguments of the plan, never through the environment.
    assert not leaks(json.dumps(ray.get_runtime_context().runtime_env))
    worker_env = ray.get(ray.remote(num_cpus=0.1)(lambda: dict(os.environ)).remote())
    assert not leaks(json.dumps(worker_env)) and not leaks(json.dumps(dict(os.environ)))


# Ids that would escape or bend a key if they ever formed one.
HOSTILE_IDS = ["../x", "/abs", "a/../../b", "%2e%2e%2fx", "nul\x00byte", "y" * 5000, "..", "C:\\win", "é/ü",
               "../../../kandinsky-other/x", "jobs/out/_SUCCESS.json", "?versionId=1", " ", "\n"]


def test_hostile_ids_stay_data_on_s3(ray_cluster, model_cache, s3):
    """Ids are data, never key parts: every key the job writes is under its output prefix, in the
    documented layout, and every id is in data/ exactly once."""
    fs, options = s3
    put_manifest(fs, "kandinsky/hostile/m.parquet", [{"id": i, "prompt": "p"} for i in HOSTILE_IDS])
    before = set(fs.find("kandinsky"))
    config = make_config(model_cache, "s3://kandinsky/hostile/m.parquet", "s3://kandinsky/jobs/out",
                         input={"rows_per_block": 4})  # several units: several shards
    config = config.model_copy(update={"storage_options": options})
    summary = run_job(config)
    assert (summary["rows"], summary["failed_rows"]) == (len(HOSTILE_IDS), 0)

    fs.invalidate_cache()
    written = set(fs.find("kandinsky")) - before
    outside = sorted(k for k in written if not k.startswith("kandinsky/jobs/out/"))
    assert outside == []
    relative = sorted(k.removeprefix("kandinsky/jobs/out/") for k in written)
    assert [k for k in relative if not LAYOUT.fullmatch(k)] == []
    shards = [k for k in relative if k.startswith("data/")]
    assert len(shards) == 4 and {s["file"] for s in summary["shards"]} == set(shards)
    ids = [i for k in shards for i in pq.read_table(fs.open(f"kandinsky/jobs/out/{k}", "rb")).column("id").to_pylist()]
    assert sorted(ids) == sorted(HOSTILE_IDS)  # each once, unaltered (NUL, newline and 5000 chars included)


def test_unreadable_s3_manifest_fails_fast_without_leaking(model_cache, s3):
    from kandinsky_engine.manifest import ManifestError, validate_manifest

    fs, options = s3
    fs.pipe("kandinsky/bad/part-0.parquet", b"not parquet")
    config = make_config(model_cache, "s3://kandinsky/bad/", "s3://kandinsky/out-bad")
    config = config.model_copy(update={"storage_options": options})
    with pytest.raises(ManifestError, match="part-0.parquet: cannot read as Parquet") as err:
        validate_manifest(config)
    assert SECRET not in str(err.value) and KEY not in str(err.value)


def test_resume_on_s3_counts_what_is_there(ray_cluster, model_cache, s3):
    """The driver's s3fs listing cache must never hide what the run (or another process) wrote:
    a resume after a lost shard, and a retry after the missing input appeared, report the truth."""
    from kandinsky_engine.jobs.verify import verify

    fs, options = s3
    rows = [{"id": f"r{i}", "prompt": f"a boat {i}"} for i in range(7)]
    rows.append({"id": "late", "prompt": "x", "task": "img2img", "image_uri": "s3://kandinsky/resume/in/late.png",
                 "strength": 0.5})
    put_manifest(fs, "kandinsky/resume/m.parquet", rows)
    config = make_config(model_cache, "s3://kandinsky/resume/m.parquet", "s3://kandinsky/resume/out",
                         input={"rows_per_block": 4})
    config = config.model_copy(update={"storage_options": options})
    first = run_job(config)
    assert (first["rows"], first["failed_rows"]) == (7, 1)

    # What a killed run leaves: one data shard and _SUCCESS.json gone.
    lost = sorted(fs.glob("kandinsky/resume/out/data/*/part-000000000000-*"))[0]
    fs.rm(lost)
    fs.rm("kandinsky/resume/out/_SUCCESS.json")
    second = run_job(config)
    assert (second["rows"], second["failed_rows"], second["rows_skipped"], second["rows_computed"]) == (7, 1, 3, 5)
    assert len(second["shards"]) == 2 and verify("s3://kandinsky/resume/out", config=config).ok

    # The missing input appears: the retry commits it and its errors shard is gone, in the summary too.
    fs.pipe("kandinsky/resume/in/late.png", png("green"))
    third = run_job(config)
    assert (third["rows"], third["failed_rows"], third["rows_retried"]) == (8, 0, 1)
    assert third["error_shards"] == [] and fs.glob("kandinsky/resume/out/errors/*/*") == []
    fs.invalidate_cache()
    listed = {k.removeprefix("kandinsky/resume/out/") for k in fs.find("kandinsky/resume/out/data")}
    assert {s["file"] for s in third["shards"]} == listed
    assert verify("s3://kandinsky/resume/out", config=config).ok
