"""S3 robustness: transient faults are retried; refused access (403) fails fast with a clear message.

A real moto S3 server sits behind tests/faultproxy.py, which faults a seeded share of requests
(503 SlowDown, 500 InternalError, connection resets before or after the server ran the request)
or refuses every request (403 AccessDenied). Setup runs with faults off, then they are switched on.
"""

from __future__ import annotations

import http.client
import time
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest
import yaml

from kandinsky_engine.jobs.run import run_job
from kandinsky_engine.storage import StorageAccessError
from tests.conftest import TINY, make_config, png, put_manifest
from tests.faultproxy import FaultProxy
from tests.reference import decode

pytestmark = pytest.mark.ray

# Canary credentials (moto accepts any): they must appear in no error message or output.
KEY, SECRET = "AKIAFAULTCANARY3X8Z", "fault-canary-secret-5e6f7a8b9c0d1e2f"
BUCKET = "faults"
COLORS = ("red", "green", "blue", "yellow")


@pytest.fixture(scope="module")
def proxy(moto_endpoint):
    with FaultProxy(moto_endpoint, seed=11) as p:
        yield p


@pytest.fixture
def s3(proxy):
    """(setup filesystem, job storage_options), both through the proxy, which starts clean."""
    import s3fs

    proxy.mode, proxy.fault_rate = "pass", 0.0
    proxy.counts.clear()
    proxy.log.clear()
    options = {"s3": {"endpoint_url": proxy.url, "key": KEY, "secret": SECRET}}
    fs = s3fs.S3FileSystem(**options["s3"], skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    yield fs, options
    proxy.mode = "pass"




def test_proxy_relays_chunked_bodies_and_head(s3, proxy):
    """The proxy itself: a chunked upload arrives whole, and HEAD keeps the object's length."""
    fs, _ = s3
    body = [b"a" * 70000, b"b" * 5]
    conn = http.client.HTTPConnection(urlsplit(proxy.url).hostname, urlsplit(proxy.url).port, timeout=30)
    conn.request("PUT", f"/{BUCKET}/relay/chunked.bin", body=iter(body), encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 200, response.read()
    conn.close()
    assert fs.info(f"{BUCKET}/relay/chunked.bin")["size"] == 70005  # HEAD: the length header, no body
    assert fs.cat(f"{BUCKET}/relay/chunked.bin") == b"".join(body)


def test_job_survives_transient_s3_faults(ray_cluster, model_cache, s3, proxy):
    fs, options = s3
    for color in COLORS:
        fs.pipe(f"{BUCKET}/in/{color}.png", png(color))
    rows = [{"id": f"t2i-{i}", "prompt": f"a cat {i}", "task": "text2img", "image_uri": None} for i in range(8)]
    rows += [{"id": f"i2i-{i}", "prompt": f"a dog {i}", "task": "img2img",
              "image_uri": f"s3://{BUCKET}/in/{COLORS[i % len(COLORS)]}.png"} for i in range(8)]
    put_manifest(fs, f"{BUCKET}/manifests/part-0.parquet", rows[::2])  # two files: text2img and img2img mixed
    put_manifest(fs, f"{BUCKET}/manifests/part-1.parquet", rows[1::2])
    config = make_config(model_cache, f"s3://{BUCKET}/manifests/", f"s3://{BUCKET}/out", defaults={"strength": 0.5},
                         input={"allowed_uri_prefixes": [f"s3://{BUCKET}/in/"]})
    config = config.model_copy(update={"storage_options": options})

    proxy.mode, proxy.fault_rate = "faults", 0.2  # about one request in five: 503, 500, reset in turn
    started = time.perf_counter()
    summary = run_job(config)
    elapsed = time.perf_counter() - started
    proxy.mode = "pass"
    counts = dict(proxy.counts)
    print(f"\nfaults injected: {counts}; job took {elapsed:.1f}s")

    assert (summary["rows"], summary["failed_rows"]) == (len(rows), 0)
    ids = []
    for path in sorted(fs.glob(f"{BUCKET}/out/data/*/*.parquet")):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        ids += table.column("id").to_pylist()
        assert all(decode(image["bytes"]).shape == (64, 64, 3) for image in table.column("image").to_pylist())
    assert sorted(ids) == sorted(r["id"] for r in rows)  # every row, exactly once
    assert fs.glob(f"{BUCKET}/out/errors/*/*.parquet") == []
    assert not [p for p in fs.find(f"{BUCKET}/out") if "/_tmp/" in p]  # no partial shards left behind
    # The faults really happened, of every kind, and were retried through.
    assert counts.get("503", 0) > 0 and counts.get("500", 0) > 0 and counts.get("reset", 0) > 0
    assert counts.get("reset-after", 0) > 0  # including lost answers to requests the server ran


def denied_setup(fs, tmp_path, name: str) -> tuple[str, str, str]:
    """A readable manifest (so only access can fail) -> (manifest URL, output URL, empty model cache)."""
    put_manifest(fs, f"{BUCKET}/{name}/manifests/part-0.parquet", [{"id": "a", "prompt": "a cat"}])
    # Nothing may load a model: the tiny model would be built into this cache if anything tried.
    return f"s3://{BUCKET}/{name}/manifests/", f"s3://{BUCKET}/{name}/out", str(tmp_path / "models")


def test_access_denied_fails_fast_naming_the_url(s3, proxy, tmp_path):
    fs, options = s3
    manifest, out, cache = denied_setup(fs, tmp_path, "deny")
    config = make_config(cache, manifest, out).model_copy(update={"storage_options": options})

    proxy.mode = "deny"
    started = time.perf_counter()
    with pytest.raises(StorageAccessError) as err:
        run_job(config)
    print(f"\n403 error after {time.perf_counter() - started:.2f}s: {err.value}")
    proxy.mode = "pass"

    message = str(err.value)
    assert manifest in message and "access denied" in message and "403" in message
    assert KEY not in message and SECRET not in message
    assert "\n" not in message
    assert isinstance(err.value, PermissionError)  # callers catching the builtin still do
    assert proxy.counts["403"] <= 3  # a refusal is not retried (transient faults are, up to 10 x 5 times)
    assert not (tmp_path / "models").exists()  # no model was built or loaded
    assert not fs.exists(out)


def test_cli_access_denied_exits_2_without_credentials(s3, proxy, tmp_path, capsys):
    from kandinsky_engine.jobs.cli import main

    fs, options = s3
    manifest, out, cache = denied_setup(fs, tmp_path, "deny-cli")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"input": {"manifest": manifest}, "output": {"path": out},
                                      "model": {"cache_dir": cache, **TINY}, "storage_options": options}))

    proxy.mode = "deny"
    code = main(["run", str(config)])
    proxy.mode = "pass"

    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert code == 2
    assert len(errors) == 1 and manifest in errors[0] and "access denied" in errors[0]
    assert "Traceback" not in captured.err
    assert KEY not in captured.out + captured.err and SECRET not in captured.out + captured.err
    assert not (tmp_path / "models").exists()
