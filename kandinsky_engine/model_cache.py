"""Model directories on object storage, mirrored once per node into the local model cache.

`remote_source(url, part, storage_options)` resolves a remote diffusers/transformers directory
(s3://, gs://, anything fsspec knows) into a `ResolvedSource`: its filesystem, root and listing, one
LIST. The driver resolves each model source once (models.check_source); the stages' actors take that
value, and `mirror(source, cache_dir, storage_options)` copies the listed files to
`{cache_dir}/remote/{url key}/{listing key}` and returns that local path, which `from_pretrained`
then reads like any other directory.

- Safetensors only: configs, tokenizer/processor files and `*.safetensors` are copied; pickle
  weights are never copied, and a folder whose only weights are pickles is refused up front
  with a message naming it (better than a from_pretrained error inside an actor on the cluster).
- Verified: the listing (path, size, ETag/checksum) is recorded in a manifest written last; every
  use checks the local copy against the resolved listing (manifest and sizes), so a truncated local
  file means a fresh download, and a remote changed since the driver listed it is either not read
  (the copy of the listed version is used: the version the run was fingerprinted with) or refused
  when it must be downloaded (the files fetched no longer match the listing).
- Atomic: files are fetched into a `.tmp-*` folder beside the target and renamed into place;
  a crash leaves only that folder, which is never trusted and is removed by the next download.
- Once per node: a file lock per URL; concurrent actors wait for the first and reuse its copy.
- A version never changes in place (its folder name is a hash of the listing): an actor still
  loading the previous version never reads a mix of old and new files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import fsspec

from .storage import options_for, protocol, redact, redact_url, url_to_fs

log = logging.getLogger("kandinsky_engine")

MANIFEST = ".kandinsky-mirror.json"
# What from_pretrained needs: configs (model_index, config, scheduler, processor, tokenizer json),
# text vocabularies (merges.txt), sentencepiece models, and safetensors weights.
COPIED = (".safetensors", ".json", ".txt", ".model")
PICKLE = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Fields that change when an object's content does, best first (S3 ETag, GCS md5/crc, Azure etag).
VERSION_FIELDS = ("ETag", "etag", "md5Hash", "crc32c", "checksum", "LastModified", "last_modified", "updated", "mtime",
                  "created")
LOCAL_PROTOCOLS = ("file", "local")


class ModelSourceError(ValueError):
    """A remote model directory cannot be used; the message says why (credentials redacted).
    A ValueError, like the other configuration errors the CLI reports without a traceback."""


@dataclass(frozen=True)
class ResolvedSource:
    """One model source (`model.prior`, `model.decoder`, `model.depth`) resolved once: what the driver's
    checks, the run fingerprint and the stages' loaders take (models.check_source makes it). It travels
    to the actors in their constructor arguments, as the job config (storage_options) does: the spec
    and the filesystem (whose options hold credentials) stay out of its repr, and so out of logs."""

    spec: str = field(repr=False)  # as configured (a hub id pinned to repo@commit)
    part: str  # 'prior', 'decoder' or 'depth'
    kind: str  # 'tiny', 'local', 'remote' or 'hub'
    # remote: the root on `fs`; tiny and local: the folder; hub: its configs' snapshot on the driver's
    # machine (a node reads its own: models.local_dir)
    path: str
    name: str  # the spec without credentials (storage.redact_url): for messages
    digest: str = ""  # hex sha256 of the weights (identity.weights_digest): what the fingerprint records
    listing: dict | None = field(default=None, repr=False)  # remote: {relative path: {size, version}}
    fs: fsspec.AbstractFileSystem | None = field(default=None, repr=False, compare=False)  # remote only


@dataclass
class Mirror:
    path: str  # local directory to pass to from_pretrained
    fetched_bytes: int  # 0 on a cache hit


def is_remote(source: str) -> bool:
    return "://" in source and protocol(source) not in LOCAL_PROTOCOLS


def check_cache_dir(cache_dir: str | os.PathLike) -> None:
    """Fail in the driver, naming the folder, if `cache_dir` cannot be written: the tiny model is
    built and remote model directories are mirrored into it, and an actor that fails there stops
    the job with a Ray error far from the cause. Writes and removes a probe file in the folder, or
    in the nearest folder above it if it does not exist yet (the model stages create it): a job
    that stops before any model loads leaves nothing behind."""
    folder = Path(cache_dir).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-probe-") as probe:
            probe.write(b"ok")
    except OSError as exc:
        raise PermissionError(f"model.cache_dir {folder} is not writable ({exc.strerror or exc}); set model.cache_dir "
                              "(or KANDINSKY_CACHE) to a writable folder") from None


def _version(info: dict) -> str | None:
    return next((str(info[k]) for k in VERSION_FIELDS if info.get(k) not in (None, "")), None)


def remote_source(url: str, part: str, storage_options: dict | None = None) -> ResolvedSource:
    """A remote model directory resolved (one LIST): its filesystem, root and listing of the files
    that would be copied; unusable directories are refused. A diffusers pipeline directory (prior,
    decoder) must have model_index.json; a depth estimator's need not. Not yet identified (digest)."""
    name = redact_url(url)
    fs, root = _filesystem(url, name, storage_options)
    listing = _listing(fs, root, name, storage_options, require_index=part != "depth")
    return ResolvedSource(url, part, "remote", root, name, listing=listing, fs=fs)


def remote_listing(url: str, storage_options: dict | None = None, require_index: bool = True) -> dict[str, dict]:
    """{relative path: {size, version}} of the files that would be copied, as `remote_source` lists
    them (stage-model selects and checks what it uploads with it)."""
    name = redact_url(url)
    return _listing(*_filesystem(url, name, storage_options), name, storage_options, require_index)


def _filesystem(url: str, name: str, storage_options: dict | None):
    try:
        return url_to_fs(url, storage_options)
    except Exception as exc:  # bad options, an unknown protocol
        raise _unlistable(name, exc, storage_options) from None


def _unlistable(name: str, exc: Exception, storage_options: dict | None) -> ModelSourceError:
    # permissions, endpoint, bad bucket name...
    return ModelSourceError(redact(f"model {name}: cannot list ({type(exc).__name__}: {exc})", storage_options))


def _listing(fs, root: str, name: str, storage_options: dict | None, require_index: bool) -> dict[str, dict]:
    try:
        fs.invalidate_cache(root)  # filesystem instances are shared: never trust a cached listing here
        found = fs.find(root, detail=True)
    except Exception as exc:
        raise _unlistable(name, exc, storage_options) from None
    listing, pickles, weights = {}, set(), set()
    prefix = root.rstrip("/") + "/"
    for path, info in found.items():
        rel = PurePosixPath(path[len(prefix):] if path.startswith(prefix) else PurePosixPath(path).name)
        if any(part.startswith(".") or part == ".." for part in rel.parts):
            continue  # hidden (e.g. huggingface-cli's .cache/) or hostile
        suffix = rel.suffix.lower()
        if suffix in PICKLE:
            pickles.add(rel)
        elif suffix in COPIED:
            if suffix == ".safetensors":
                weights.add(rel.parent)
            listing[str(rel)] = {"size": int(info.get("size") or 0), "version": _version(info)}
    if not listing:
        raise ModelSourceError(f"model {name}: no model files found (nothing at that URL?)")
    if require_index and "model_index.json" not in listing:
        raise ModelSourceError(f"model {name} is not a diffusers pipeline directory (no model_index.json)")
    pickle_only = sorted({str(p) for p in pickles if p.parent not in weights})
    if pickle_only:
        raise ModelSourceError(
            f"model {name}: pickle weights without safetensors ({', '.join(pickle_only)}); only safetensors are "
            "loaded - convert them (e.g. save_pretrained(..., safe_serialization=True)) and upload the result"
        )
    return listing


def read_json(url: str, relpath: str, storage_options: dict | None = None) -> dict:
    """One small file of a remote model (e.g. unet/config.json), without mirroring the weights."""
    try:
        fs, root = url_to_fs(url, storage_options)
        return json.loads(fs.cat_file(f"{root.rstrip('/')}/{relpath}"))
    except Exception as exc:
        raise ModelSourceError(redact(f"model {redact_url(url)}: cannot read {relpath} "
                                      f"({type(exc).__name__}: {exc})", storage_options)) from None


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def url_folder(url: str, cache_dir: str | os.PathLike, storage_options: dict | None = None) -> Path:
    """The cache folder of one URL. The endpoint is part of the key (same bucket name, other
    service); credentials are not (rotating them must not force a download)."""
    endpoint = str(options_for(url, storage_options).get("endpoint_url", ""))
    return Path(cache_dir).expanduser() / "remote" / _key(redact_url(url), endpoint)


def _complete(target: Path, listing: dict) -> bool:
    """A mirror is trusted only if its manifest (written last) matches the remote listing and
    every file has the recorded size."""
    try:
        recorded = json.loads((target / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    if recorded != listing:
        return False
    return all((target / rel).is_file() and (target / rel).stat().st_size == meta["size"]
               for rel, meta in listing.items())


def mirror(source: ResolvedSource, cache_dir: str | os.PathLike, storage_options: dict | None = None) -> Mirror:
    """The local copy of the remote `source` at the version it was resolved with (its listing): a
    verified hit lists nothing; a download fetches the listed files and lists once more to check them."""
    from filelock import FileLock, Timeout

    listing = source.listing
    folder = url_folder(source.spec, cache_dir, storage_options)
    target = folder / _key(json.dumps(listing, sort_keys=True))
    if _complete(target, listing):
        return Mirror(str(target), 0)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("model %s: another process is downloading it; waiting", source.name)
        lock.acquire()  # flock: released by the OS if its holder dies
    try:
        if _complete(target, listing):  # the process we waited for fetched it
            return Mirror(str(target), 0)
        return Mirror(str(target), _download(source, storage_options, folder, target))
    finally:
        lock.release()


def _download(source: ResolvedSource, storage_options: dict | None, folder: Path, target: Path) -> int:
    """Fetch into a temporary folder, verify, write the manifest last, rename into place. Runs
    under the URL's lock, so any `.tmp-*` folder found here is a crashed download."""
    name, listing, fs = source.name, source.listing, source.fs
    for stale in folder.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)  # incomplete or tampered: never trusted
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
    started = time.perf_counter()
    total = sum(meta["size"] for meta in listing.values())
    log.info("model %s: downloading %d files (%.1f MB)", name, len(listing), total / 1e6)
    try:
        rels = sorted(listing)
        for rel in rels:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            # Lists, not a loop: async filesystems (s3fs, gcsfs) fetch the files concurrently.
            fs.get([f"{source.path.rstrip('/')}/{rel}" for rel in rels], [str(tmp / rel) for rel in rels])
            # Listed again, and needed: a GET names no version, so only a listing taken after the fetch
            # tells that the bytes are the listed version's (an overwrite with equal sizes, during the
            # download or since the driver resolved the source, changes the ETags).
            after = _listing(fs, source.path, name, storage_options, require_index=False)
        except ModelSourceError:
            raise
        except Exception as exc:
            raise ModelSourceError(redact(f"model {name}: download failed ({type(exc).__name__}: {exc})",
                                          storage_options)) from None
        short = [rel for rel in rels if not (tmp / rel).is_file() or (tmp / rel).stat().st_size != listing[rel]["size"]]
        if short:
            raise ModelSourceError(f"model {name}: downloaded files have the wrong size: {', '.join(short[:5])}")
        if after != listing:
            raise ModelSourceError(f"model {name} changed since the job listed it (before or while it was being "
                                   "downloaded); run again")
        (tmp / MANIFEST).write_text(json.dumps({"url": name, "files": listing}, indent=1, sort_keys=True))
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in folder.iterdir():  # earlier versions of this URL: disk is not free on a GPU node
        if old.is_dir() and not old.name.startswith(".") and old != target:
            shutil.rmtree(old, ignore_errors=True)
    log.info("model %s: %.1f MB in %.1f s", name, total / 1e6, time.perf_counter() - started)
    return total
