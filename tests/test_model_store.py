"""Model directories on object storage (moto's real S3 server on loopback): mirrored once per
node, verified on every use, refused when only pickle weights are there, loaded like local dirs."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kandinsky_engine.config import ModelConfig
from kandinsky_engine.model_cache import MANIFEST, ModelSourceError, mirror, remote_source, url_folder
from kandinsky_engine.identity import model_identity
from kandinsky_engine.families import supported_tasks
from kandinsky_engine.models import check_source, resolve_source
from tests.conftest import KEY, SECRET, make_config, write_manifest

BUCKET = "kandinsky/models"


@pytest.fixture(scope="module")
def remote(s3, tiny_root):
    """The tiny prior and decoder uploaded to s3://kandinsky/models/{prior,decoder}."""
    fs, options = s3
    for part in ("prior", "decoder"):
        fs.put(str(tiny_root / part), f"{BUCKET}/{part}", recursive=True)
    return fs, options, {part: f"s3://{BUCKET}/{part}" for part in ("prior", "decoder")}


@pytest.fixture
def server_gets():
    """GET requests as moto's server (werkzeug) logs them: counted server-side, not by the client."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler, logger = Collect(), logging.getLogger("werkzeug")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield lambda pattern: sum(1 for line in lines if re.search(rf"GET /{pattern}[ ?]", line))
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def copy_remote(fs, src: str, dst: str) -> str:
    fs.copy(f"{BUCKET}/{src}", f"{BUCKET}/{dst}", recursive=True)
    return f"s3://{BUCKET}/{dst}"


def mirrored(url: str, cache, options):
    """What an actor does with a decoder URL the driver resolved just now (one listing): its mirror."""
    return mirror(remote_source(url, "decoder", options), cache, options)


def local_files(root: str) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in Path(root).rglob("*") if p.is_file()}


# --- (a) stages load from the s3 URL and produce the same images as from the local directory ---


@pytest.mark.ray
def test_job_with_s3_models_matches_local_dirs(ray_cluster, tiny_root, remote, tmp_path):
    fs, options, urls = remote
    rows = [{"id": "a", "prompt": "a red cat"}, {"id": "b", "prompt": "Красный кот", "width": 128}]
    manifest = write_manifest(tmp_path / "manifest.parquet", rows)
    local = make_config(str(tmp_path / "cache-local"), manifest, str(tmp_path / "out-local"),
                        model={"prior": str(tiny_root / "prior"), "decoder": str(tiny_root / "decoder")})
    cache = tmp_path / "cache-s3"
    remote_cfg = make_config(str(cache), manifest, str(tmp_path / "out-s3"), model=urls)
    remote_cfg = remote_cfg.model_copy(update={"storage_options": options})

    from kandinsky_engine.jobs.run import run_job

    summaries = [run_job(local), run_job(remote_cfg)]
    assert [s["rows"] for s in summaries] == [2, 2]
    out = {name: {r["id"]: r for r in pq.read_table(tmp_path / f"out-{name}" / "data").to_pylist()}
           for name in ("local", "s3")}
    # Same safetensors, same from_pretrained path: bit-identical images.
    for i in ("a", "b"):
        assert out["s3"][i]["image"] == out["local"][i]["image"]
    # The URL as configured is recorded, not the node's cache path.
    # (before the "@": the weights digest, a hash of the remote listing here)
    assert {(r["prior_model"].split("@")[0], r["decoder_model"].split("@")[0]) for r in out["s3"].values()} == \
        {(urls["prior"], urls["decoder"])}
    # Three actors (prior, decoder, movq) in three processes, two of them on the decoder URL:
    # one mirror per URL, one version each, no temporary folder left.
    mirrors = sorted((cache / "remote").iterdir())
    assert len(mirrors) == 2
    for folder in mirrors:
        assert [p.name for p in folder.iterdir() if p.is_dir()] == [p.name for p in folder.iterdir()
                                                                    if p.is_dir() and not p.name.startswith(".")]
        (version,) = [p for p in folder.iterdir() if p.is_dir()]
        assert (version / MANIFEST).exists()
    everything = json.dumps(summaries[1]) + str([{k: v for k, v in r.items() if k != "image"}
                                                   for r in out["s3"].values()])
    assert KEY not in everything and SECRET not in everything


def test_driver_checks_remote_models_without_downloading(remote, tmp_path):
    fs, options, urls = remote
    model = ModelConfig(cache_dir=str(tmp_path), **urls)
    for part in ("prior", "decoder"):
        check_source(urls[part], part, str(tmp_path), options)
    assert supported_tasks(model, options) == ("text2img", "img2img", "mix", "variation")  # unet/config.json only
    assert not (tmp_path / "remote").exists()
    with pytest.raises(ModelSourceError, match="no model_index.json"):
        check_source(f"s3://{BUCKET}/decoder/unet", "decoder", str(tmp_path), options)


def test_each_remote_source_is_listed_once_by_the_driver_and_not_again_by_its_loaders(remote, tmp_path, server_gets,
                                                                                        monkeypatch):
    """The driver resolves each model source once (checks, family, fingerprint: one LIST each); the stages
    load from that value: one more LIST when a node downloads (to check what it fetched), none on a hit."""
    import kandinsky_engine.jobs.run as run
    from kandinsky_engine.models import resolve_sources
    from kandinsky_engine.stages.prior import PriorStage

    fs, options, _ = remote
    urls = {part: copy_remote(fs, part, f"{part}-once") for part in ("prior", "decoder")}  # listed by this test only
    lists = lambda part: server_gets(rf"kandinsky\?list-type=2&prefix=models/{part}-once/&\S*")  # noqa: E731
    copied = {part: lists(part) for part in urls}  # the copy's own
    listings = lambda part: lists(part) - copied[part]  # noqa: E731
    manifest = write_manifest(tmp_path / "manifest.parquet", [{"id": "a", "prompt": "a red cat"}])
    config = make_config(str(tmp_path / "cache"), manifest, str(tmp_path / "out"), model=urls)
    config = config.model_copy(update={"storage_options": options})

    class RayStarts(Exception):
        pass

    def connect(*args, **kwargs):  # everything before Ray is the driver's own resolution
        raise RayStarts

    monkeypatch.setattr(run, "connect", connect)
    with pytest.raises(RayStarts):
        run.run_job(config)
    assert (listings("prior"), listings("decoder")) == (1, 1)
    assert not (tmp_path / "cache" / "remote").exists()  # listed, not downloaded

    sources = resolve_sources(config.model, ("prior",), options)  # as the driver hands them to the stages
    assert listings("prior") == 2
    PriorStage(config, sources=sources)  # six components from one mirror: downloaded, then checked with one LIST
    PriorStage(config, sources=sources)  # a verified hit: nothing listed
    assert listings("prior") == 3


# --- (b) concurrent processes on one node: one download, one path ---


def _resolve_in_child(url, cache, options, barrier, results):
    barrier.wait()  # all start at once: without the lock each would find no mirror and download
    try:
        m = mirrored(url, cache, options)
        results.put((m.path, m.fetched_bytes))
    except Exception as exc:  # reported, so that the test fails at once instead of waiting
        results.put((f"error: {exc!r}", -1))


def test_concurrent_processes_download_once(remote, tmp_path, server_gets):
    fs, options, _ = remote
    url = copy_remote(fs, "decoder", "decoder-concurrent")  # an object only this test fetches
    n = 4
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_resolve_in_child, args=(url, str(tmp_path), options, barrier, results))
             for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    paths = {path for path, _ in got}
    assert len(paths) == 1  # the same directory for every process
    remote_bytes = sum(size for name, size in local_files(paths.pop()).items() if name != MANIFEST)
    # One process downloaded everything, the three others waited and reused its copy.
    assert sorted(fetched for _, fetched in got) == [0] * (n - 1) + [remote_bytes]
    # Server side: each weight file was fetched once, by one process.
    assert server_gets(r"kandinsky/models/decoder-concurrent/unet/diffusion_pytorch_model\.safetensors") == 1
    assert server_gets(r"kandinsky/models/decoder-concurrent/movq/diffusion_pytorch_model\.safetensors") == 1


# --- (c) verification: local tampering, remote changes, pickle-only weights ---


def test_truncated_local_file_is_downloaded_again(remote, tmp_path):
    fs, options, urls = remote
    first = mirrored(urls["decoder"], tmp_path, options)
    assert first.fetched_bytes > 0
    assert mirrored(urls["decoder"], tmp_path, options).fetched_bytes == 0  # a verified hit
    weights = Path(first.path) / "unet" / "diffusion_pytorch_model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    again = mirrored(urls["decoder"], tmp_path, options)
    assert again.path == first.path and again.fetched_bytes > 0 and weights.stat().st_size == size


def test_changed_remote_file_is_downloaded_again(remote, tmp_path):
    fs, options, _ = remote
    url = copy_remote(fs, "decoder", "decoder-changing")
    first = mirrored(url, tmp_path, options)
    config = json.loads(fs.cat(f"{BUCKET}/decoder-changing/scheduler/scheduler_config.json"))
    config["steps_offset"] = 0  # same file name, new content (and ETag)
    fs.pipe(f"{BUCKET}/decoder-changing/scheduler/scheduler_config.json", json.dumps(config).encode())
    second = mirrored(url, tmp_path, options)
    assert second.fetched_bytes > 0 and second.path != first.path
    assert json.loads((Path(second.path) / "scheduler" / "scheduler_config.json").read_text())["steps_offset"] == 0
    assert not Path(first.path).exists()  # the old version is pruned: a GPU node's disk is not free
    assert mirrored(url, tmp_path, options).fetched_bytes == 0


def test_pickle_only_weights_are_refused_and_pickles_never_copied(remote, tmp_path):
    fs, options, _ = remote
    # Both formats in one folder (as hub repos often have): only the safetensors file is copied.
    both = copy_remote(fs, "decoder", "decoder-both")
    fs.pipe(f"{BUCKET}/decoder-both/movq/diffusion_pytorch_model.bin", b"pickle bytes")
    path = resolve_source(both, "decoder", str(tmp_path), options)
    assert (Path(path) / "movq" / "diffusion_pytorch_model.safetensors").exists()
    assert not list(Path(path).rglob("*.bin"))
    # Pickle only: refused before anything is downloaded, in the driver and in the actors.
    pickled = copy_remote(fs, "decoder", "decoder-pickle")
    fs.rm(f"{BUCKET}/decoder-pickle/movq/diffusion_pytorch_model.safetensors")
    fs.pipe(f"{BUCKET}/decoder-pickle/movq/diffusion_pytorch_model.bin", b"pickle bytes")
    for call in (check_source, resolve_source):
        with pytest.raises(ModelSourceError, match=r"pickle weights without safetensors \(movq/diffusion_pytorch_model"
                                                   r"\.bin\)") as err:
            call(pickled, "decoder", str(tmp_path / "pickle-cache"), options)
        assert KEY not in str(err.value) and SECRET not in str(err.value)
    assert not (tmp_path / "pickle-cache" / "remote").exists()


def test_errors_and_identity_hold_no_credentials(remote, tmp_path):
    fs, options, _ = remote
    with pytest.raises(ModelSourceError, match="no model files found") as err:
        resolve_source(f"s3://{BUCKET}/nothing-here", "decoder", str(tmp_path), options)
    with pytest.raises(ModelSourceError, match="cannot list") as err2:
        resolve_source("s3://no-such-bucket/decoder", "decoder", str(tmp_path), options)
    for message in (str(err.value), str(err2.value)):
        assert KEY not in message and SECRET not in message
    digests = {"prior": "a" * 64, "decoder": "b" * 64, "depth": "c" * 64}
    identity = model_identity(ModelConfig(prior="sftp://alice:hunter22@host/models/prior", decoder="s3://b/d"), digests)
    revision = identity.pop("model_revision")
    assert identity == {"prior_model": f"sftp://***@host/models/prior@{'a' * 16}", "decoder_model": f"s3://b/d@{'b' * 16}",
                        "depth_model": f"{ModelConfig().depth}@{'c' * 16}"}
    # One digest of the whole model's weights, not of where they were read from.
    other = model_identity(ModelConfig(prior="/elsewhere", decoder="s3://b/d"), {**digests, "depth": "d" * 64})
    assert re.fullmatch(r"[0-9a-f]{16}", revision) and other["model_revision"] != revision
    assert model_identity(ModelConfig(prior="/elsewhere"), digests)["model_revision"] == revision


def test_any_fsspec_filesystem(tiny_root, tmp_path):
    """memory:// has no ETag: sizes and timestamps detect changes instead."""
    import fsspec

    mem = fsspec.filesystem("memory")
    mem.put(str(tiny_root / "depth"), "/store/depth", recursive=True)
    path = resolve_source("memory://store/depth", "depth", str(tmp_path))
    from transformers import AutoModelForDepthEstimation

    assert AutoModelForDepthEstimation.from_pretrained(path, use_safetensors=True).config.hidden_size == 32
    assert local_files(path).keys() - {MANIFEST} == local_files(str(tiny_root / "depth")).keys()
    mem.rm("/store", recursive=True)


# --- (d) a crashed download is never trusted ---


def _crash_mid_download(folder, lock_path):
    from filelock import FileLock

    FileLock(lock_path).acquire()
    tmp = Path(folder) / ".tmp-crashed"
    (tmp / "unet").mkdir(parents=True)
    (tmp / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
    os._exit(1)  # dies holding the lock, mid-download


def test_crashed_download_is_not_trusted(remote, tmp_path):
    fs, options, urls = remote
    url = urls["decoder"]
    folder = url_folder(url, tmp_path, options)
    folder.mkdir(parents=True)
    ctx = multiprocessing.get_context("spawn")
    crash = ctx.Process(target=_crash_mid_download, args=(str(folder), str(folder / ".lock")))
    crash.start()
    crash.join(timeout=120)
    assert crash.exitcode == 1 and (folder / ".tmp-crashed").exists()
    # A version folder without its manifest (the manifest is written last) is not trusted either.
    good = mirrored(url, tmp_path / "elsewhere", options)
    fake = folder / Path(good.path).name
    fake.mkdir()
    (fake / "model_index.json").write_text("{}")
    m = mirrored(url, tmp_path, options)  # the lock died with its holder: no wait, no hang
    assert m.fetched_bytes > 0 and Path(m.path) == fake
    assert local_files(m.path) == local_files(good.path)
    assert not list(folder.glob(".tmp-*"))  # the crashed download is cleaned up
