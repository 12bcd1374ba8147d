"""What a row's pixels depend on besides its manifest row and the job config: the model weights
and the libraries that compute with them. Both go into the run fingerprint (jobs/resume.py), so
that changed weights at the same path, or an upgraded torch, never resume into a mix of two
models; the weights digest also goes into every output row (`prior_model` etc.).

- A local directory (and the tiny model): sha256 over every file `from_pretrained` reads
  (safetensors, configs, vocabularies), through the digest cache below, so a 5 GB decoder is
  hashed once a day, not on every run.
- A remote directory: its listing with ETags / checksums (the one the driver resolved it with,
  model_cache.remote_source), which is what the per-node mirror is verified against; nothing is
  downloaded.
- A hub id: the commit its branch or tag names now (kandinsky_engine/hub.py), from the hub or the
  local Hugging Face cache; one that can be had from neither is an error, never a guess.

Manifest files are identified here too (`file_identity`): the ETag on object stores (no read),
ETag / Content-MD5 / Last-Modified with Content-Length over http(s), the sha256 of the bytes on
disk.

The digest cache (`DigestCache`, in `cache_dir/digests/`) is what the fast path trusts: a local
file's cached sha256 is used while its size, mtime, ctime, inode and device are all unchanged and
the digest is younger than `model.digest_max_age_s`. A rewrite in place changes ctime even when
the mtime is set back (`touch -d`, `os.utime`), and `cp -p`, `rsync -a` and `tar -x` make a new
inode; only a change that restores every one of these (editing a block device, a clock set back)
passes until the digest ages out. `verify` never uses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from importlib import metadata
from pathlib import Path

from .config import ModelConfig
from .hub import resolve_commit, split_revision
from .model_cache import COPIED, VERSION_FIELDS, ResolvedSource
from .storage import is_http, is_local, is_object_store, redact_url

# What identifies a file's version over http(s), strongest first; Last-Modified (one-second
# resolution) only with the Content-Length beside it.
HTTP_VERSION_FIELDS = ("ETag", "Content-MD5", "Digest", "Last-Modified")

# Libraries whose version can change pixels: the maths (torch), the pipelines' semantics
# (diffusers, transformers) and the encoders (Pillow: PNG/JPEG/WebP bytes, resizing).
LIBRARIES = ("torch", "diffusers", "transformers", "Pillow")


def library_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in LIBRARIES}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def stat_key(st: os.stat_result) -> str:
    """What the digest cache compares: size, mtime, ctime, inode and device."""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"


class DigestCache:
    """sha256 of local files under one name (a model directory, a manifest file), kept in
    `cache_dir/digests/` (see the module docstring). `rehash`: ignore what is cached (verify)."""

    def __init__(self, cache_dir: str | os.PathLike, name: str, max_age_s: float, rehash: bool = False):
        self.path = Path(cache_dir).expanduser() / "digests" / (hashlib.sha256(name.encode()).hexdigest()[:16] + ".json")
        self.max_age_s = max_age_s
        try:
            self.cached = {} if rehash else json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.cached = {}
        self.fresh: dict[str, dict] = {}

    def sha256(self, file: Path, rel: str = "") -> str:
        before = stat_key(file.stat())
        entry = self.cached.get(rel)
        if (isinstance(entry, dict) and entry.get("stat") == before
                and time.time() - entry.get("at", 0) < self.max_age_s):
            self.fresh[rel] = entry
            return entry["sha256"]
        sha = _file_sha256(file)
        if stat_key(file.stat()) == before:  # not cached if it changed while it was read
            self.fresh[rel] = {"stat": before, "sha256": sha, "at": time.time()}
        return sha

    def save(self) -> None:
        if self.fresh == self.cached:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(self.fresh))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache only costs the hashing next time


def directory_digest(path: str | os.PathLike, cache_dir: str | os.PathLike, max_age_s: float = 86400.0,
                     rehash: bool = False) -> str:
    """sha256 over (relative path, sha256) of every model file below `path`, hidden files skipped."""
    root = Path(path).resolve()
    cache = DigestCache(cache_dir, str(root), max_age_s, rehash)
    files = {}
    for file in sorted(root.rglob("*")):
        rel = file.relative_to(root)
        if not file.is_file() or file.suffix.lower() not in COPIED or any(p.startswith(".") for p in rel.parts):
            continue
        files[str(rel)] = cache.sha256(file, str(rel))
    cache.save()
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def file_identity(fs, name: str, info: dict, cache_dir: str, max_age_s: float = 86400.0, rehash: bool = False) -> str:
    """What changes when a manifest file's content does (see the module docstring)."""
    if is_object_store(fs) or is_http(fs):
        fields = VERSION_FIELDS if is_object_store(fs) else HTTP_VERSION_FIELDS
        version = next((str(info[k]).strip('"') for k in fields if info.get(k) not in (None, "")), None)
        if version:
            return f"{version}:{info.get('size')}"
    if is_local(fs):
        return DigestCache(cache_dir, name, max_age_s, rehash).sha256(Path(fs._strip_protocol(name)))
    digest = hashlib.sha256()  # a store that names no version: the bytes, on every run
    with fs.open(name, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_stamp(fs, name: str, info: dict | None = None) -> tuple:
    """Cheap evidence that a manifest file did not change: its size and version (ETag...) on
    object stores and http, its size and mtime on disk. A read task compares it with the plan's
    before it reads."""
    if is_local(fs):
        st = os.stat(fs._strip_protocol(name))
        return st.st_size, st.st_mtime_ns
    info = info or fs.info(name)
    fields = VERSION_FIELDS if is_object_store(fs) else HTTP_VERSION_FIELDS
    return info.get("size"), next((str(info[k]) for k in fields if info.get(k) not in (None, "")), "")


def weights_digest(source: ResolvedSource, cache_dir: str, max_age_s: float = 86400.0, rehash: bool = False,
                   revision: str | None = None) -> str:
    """The identity of the weights behind a resolved model source (models.check_source), hex sha256:
    of the remote listing, of a hub id's commit (`revision`: model.revision), or of the files of a
    local directory or the tiny model. hub.HubUnavailable when a hub id's commit cannot be had."""
    if source.kind == "remote":
        return hashlib.sha256(json.dumps(source.listing, sort_keys=True).encode()).hexdigest()
    if source.kind == "hub":  # its commit names its files exactly; nothing is downloaded to say so
        commit = resolve_commit(source.spec, revision)
        return hashlib.sha256(f"hub:{split_revision(source.spec)[0]}@{commit}".encode()).hexdigest()
    return directory_digest(source.path, cache_dir, max_age_s, rehash)


def weights_digests(sources: dict[str, ResolvedSource]) -> dict[str, str]:
    """{part: digest} of the resolved model parts a job reads (models.resolve_sources): what the run
    fingerprint and every row's *_model columns record."""
    return {part: source.digest for part, source in sources.items()}


def model_identity(model: ModelConfig, digests: dict[str, str]) -> dict[str, str]:
    """What every output row records about its weights: per part, the source as configured (the URL,
    not the node's cache path, without any user:password@) and the first 16 hex chars of its digest;
    and `model_revision`, 16 hex chars of one sha256 over every part's digest: the whole model's
    weights, whatever the sources are called (rows with equal values come from identical weights)."""
    identity = {f"{part}_model": f"{redact_url(getattr(model, part))}@{digests[part][:16]}" for part in digests}
    revision = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]
    return {**identity, "model_revision": revision}
