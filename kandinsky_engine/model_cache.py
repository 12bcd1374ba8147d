"""Model directories on object storage, mirrored once per node into the local model cache.

`mirror(url, cache_dir, storage_options)` copies a remote diffusers/transformers directory
(s3://, gs://, anything fsspec knows) to `{cache_dir}/remote/{url key}/{listing key}` and returns
that local path, which `from_pretrained` then reads like any other directory.

- Safetensors only: configs, tokenizer/processor files and `*.safetensors` are copied; pickle
  weights are never copied, and a folder whose only weights are pickles is refused up front
  with a message naming it (better than a from_pretrained error inside an actor on the cluster).
- Verified: the remote listing (path, size, ETag/checksum) is recorded in a manifest written
  last; every use re-lists the remote (one LIST) and checks the local sizes, so a changed
  remote or a truncated local file means a fresh download.
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
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

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


def remote_listing(url: str, storage_options: dict | None = None, require_index: bool = True) -> dict[str, dict]:
    """{relative path: {size, version}} of the files that would be copied; refuses unusable dirs.

    `require_index`: a diffusers pipeline directory (prior, decoder) must have model_index.json.
    """
    name = redact_url(url)
    try:
        fs, root = url_to_fs(url, storage_options)
        fs.invalidate_cache(root)  # filesystem instances are shared: never trust a cached listing here
        found = fs.find(root, detail=True)
    except Exception as exc:  # permissions, endpoint, bad bucket name...
        message = f"model {name}: cannot list ({type(exc).__name__}: {exc})"
        raise ModelSourceError(redact(message, storage_options)) from None
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


def mirror(url: str, cache_dir: str | os.PathLike, storage_options: dict | None = None,
           require_index: bool = True) -> Mirror:
    from filelock import FileLock, Timeout

    listing = remote_listing(url, storage_options, require_index)
    folder = url_folder(url, cache_dir, storage_options)
    target = folder / _key(json.dumps(listing, sort_keys=True))
    if _complete(target, listing):
        return Mirror(str(target), 0)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("model %s: another process is downloading it; waiting", redact_url(url))
        lock.acquire()  # flock: released by the OS if its holder dies
    try:
        if _complete(target, listing):  # the process we waited for fetched it
            return Mirror(str(target), 0)
        return Mirror(str(target), _download(url, storage_options, listing, folder, target))
    finally:
        lock.release()


def _download(url: str, storage_options: dict | None, listing: dict, folder: Path, target: Path) -> int:
    """Fetch into a temporary folder, verify, write the manifest last, rename into place. Runs
    under the URL's lock, so any `.tmp-*` folder found here is a crashed download."""
    name = redact_url(url)
    for stale in folder.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)  # incomplete or tampered: never trusted
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
    started = time.perf_counter()
    total = sum(meta["size"] for meta in listing.values())
    log.info("model %s: downloading %d files (%.1f MB)", name, len(listing), total / 1e6)
    try:
        fs, root = url_to_fs(url, storage_options)
        rels = sorted(listing)
        for rel in rels:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            # Lists, not a loop: async filesystems (s3fs, gcsfs) fetch the files concurrently.
            fs.get([f"{root.rstrip('/')}/{rel}" for rel in rels], [str(tmp / rel) for rel in rels])
            after = remote_listing(url, storage_options, require_index=False)
        except ModelSourceError:
            raise
        except Exception as exc:
            raise ModelSourceError(redact(f"model {name}: download failed ({type(exc).__name__}: {exc})",
                                          storage_options)) from None
        short = [rel for rel in rels if not (tmp / rel).is_file() or (tmp / rel).stat().st_size != listing[rel]["size"]]
        if short:
            raise ModelSourceError(f"model {name}: downloaded files have the wrong size: {', '.join(short[:5])}")
        if after != listing:
            raise ModelSourceError(f"model {name} changed while it was being downloaded; run again")
        (tmp / MANIFEST).write_text(json.dumps({"url": name, "files": listing}, indent=1, sort_keys=True))
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in folder.iterdir():  # earlier versions of this URL: disk is not free on a GPU node
        if old.is_dir() and not old.name.startswith(".") and old != target:
            shutil.rmtree(old, ignore_errors=True)
    log.info("model %s: %.1f MB in %.1f s", name, total / 1e6, time.perf_counter() - started)
    return total
