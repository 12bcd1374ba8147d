"""Shared fixtures: the tiny model (built once per session), manifests, configs, a local Ray cluster."""

from __future__ import annotations

import os
import socket
import tempfile
import urllib.request
from pathlib import Path

# Tests never reach the hub: hub ids are read from a Hugging Face cache of the session's own (set
# before anything imports huggingface_hub, and before Ray starts its workers, which inherit it).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = HF_HUB_CACHE = tempfile.mkdtemp(prefix="kandinsky-tests-hub-")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# gcsfs's default filesystem first asks Cloud Storage's gRPC control plane for the bucket's layout
# (hierarchical or zonal), which an emulator on loopback does not serve (60 s of retries per bucket).
# Its plain JSON-API filesystem is what the emulator speaks (tests/test_gcs.py); set before Ray starts.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kandinsky_engine.config import JobConfig  # noqa: E402
from kandinsky_engine.families.tiny import ensure_tiny_model  # noqa: E402

FAST = dict(num_inference_steps=2, prior_num_inference_steps=2, width=64, height=64, seed=7)
# The default weights are the real ones from the hub: tests name the tiny offline model.
TINY = {"prior": "tiny", "decoder": "tiny", "depth": "tiny"}
TINY_YAML = "prior: tiny, decoder: tiny, depth: tiny"


# Marks by what a test needs, from the fixtures it uses (directly or through other fixtures), so
# that no mark is forgotten or left behind: `make check` runs the tests that start no Ray (and the
# one `smoke` job), `make test` all of them.
NEEDS = {"ray": {"ray_cluster", "ray_head"}, "s3": {"s3", "moto_endpoint", "gcs"}}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for mark, fixtures in NEEDS.items():
            if fixtures & set(item.fixturenames):
                item.add_marker(mark)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that sets torch's thread count (stages do, per process) leaves it as it found it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> str:
    cache = tmp_path_factory.mktemp("model-cache")
    ensure_tiny_model(cache)
    return str(cache)


@pytest.fixture(scope="session")
def tiny_root(model_cache) -> Path:
    return ensure_tiny_model(model_cache)


def write_manifest(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if schema is None:  # from_pylist alone would take the columns of the first row only
        keys = list(dict.fromkeys(k for r in rows for k in r))
        rows = [{k: r.get(k) for k in keys} for r in rows]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def png(color, size=(64, 64)) -> bytes:
    """A solid-colour PNG image."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def put_manifest(fs, key: str, rows: list[dict]) -> None:
    """Write `rows` as a Parquet manifest at `key` of the filesystem `fs` (e.g. s3fs)."""
    import io

    keys = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist alone takes the first row's keys
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), buf)
    fs.pipe(key, buf.getvalue())


def make_config(model_cache: str, manifest: str, out: str, fuse_stages: bool = True, **sections) -> JobConfig:
    """A job config for tests. Stages are fused by default: one actor process to start per job
    instead of three (about 6 s less per job on these machines), with the same bytes
    (tests/test_job.py compares the two); tests of actor pools themselves pass fuse_stages=False."""
    data = {
        "input": {"manifest": manifest},
        "output": {"path": out},
        "model": {"cache_dir": model_cache, **TINY},
        "defaults": dict(FAST),
        "fuse_stages": fuse_stages,
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return JobConfig.model_validate(data)


def batch_of(rows: list[dict], config: JobConfig) -> dict[str, np.ndarray]:
    """A resolved numpy batch, as Ray Data hands it to the first stage: the pipeline's own prepare
    step on the rows as one unit, then Arrow -> numpy as Ray converts it."""
    from kandinsky_engine.pipelines.prepare import prepared_batch

    return prepared_batch(rows, config.defaults, unit="test/0")


def run_chain(stages, rows: list[dict], until: int | None = None) -> dict[str, np.ndarray]:
    """Run rows through a (config, [stage, ...]) chain directly, as the pipeline would, without Ray."""
    config, chain = stages
    batch = batch_of(rows, config)
    for stage in chain[:until]:
        batch = stage(batch)
    return batch


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for every pipeline test (start-up costs seconds)."""
    import ray

    # address="local": a fresh cluster even if another one runs on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# Canary credentials: moto accepts any; they must appear in no output, report or error.
KEY, SECRET = "AKIACANARY7Q2W9E4R6T", "canary-secret-d9f8a7b6c5e4f3a2b1c0"


@pytest.fixture(scope="session")
def moto_endpoint() -> str:
    """A real S3 API on loopback (moto's server), shared by the S3 tests; each uses its own bucket."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:  # a free port on loopback
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="module")
def s3(moto_endpoint):
    """Bucket `kandinsky` on the moto server; yields (s3fs filesystem, storage_options for a job)."""
    import s3fs

    # moto keeps its buckets in process-wide memory: start each module from an empty store.
    urllib.request.urlopen(urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST")).close()
    options = {"s3": {"endpoint_url": moto_endpoint, "key": KEY, "secret": SECRET}}
    fs = s3fs.S3FileSystem(**options["s3"])
    fs.mkdir("kandinsky")
    yield fs, options
    s3fs.S3FileSystem.clear_instance_cache()  # cached listings of this module's store: the next starts empty


@pytest.fixture(scope="module")
def gcs():
    """Bucket `kandinsky` on a Cloud Storage emulator on loopback (its JSON API, which gcsfs speaks);
    yields (gcsfs filesystem, storage_options for a job)."""
    import fsspec
    from gcp_storage_emulator.server import create_server

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="kandinsky")
    server.start()
    options = {"gs": {"endpoint_url": f"http://127.0.0.1:{port}", "token": "anon", "project": "test"}}
    yield fsspec.filesystem("gs", **options["gs"]), options
    server.stop()


def assert_rows_match_stages(config, out: Path, stage_classes, wanted: list[dict], tolerance: int) -> None:
    """Each wanted row's image in a job's data/ is what the stage classes make of the row alone, within
    `tolerance` levels of 255 (the batch shape changes float results)."""
    import pyarrow.parquet as pq

    from tests.reference import decode

    chain = (config, [cls(config) for cls in stage_classes])
    rows = {r["id"]: r for r in pq.read_table(out / "data").to_pylist()}
    for want in wanted:
        alone = decode(run_chain(chain, [want])["image"][0])
        diff = np.abs(alone.astype(int) - decode(rows[want["id"]]["image"]["bytes"]).astype(int)).max()
        assert diff <= tolerance, (want["id"], diff)


@pytest.fixture
def counted(monkeypatch):
    """A torch.compile backend (model.compile's, kandinsky_engine.compiled.BACKEND) that runs the
    captured graph as it is and counts compilations: the graphs captured, in order."""
    from kandinsky_engine import compiled

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(compiled, "BACKEND", backend)
    return graphs
