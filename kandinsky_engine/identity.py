"""What a row's pixels depend on besides its manifest row and the job config: the model weights
and the libraries that compute with them. Both go into the run fingerprint (jobs/resume.py), so
that changed weights at the same path, or an upgraded torch, never resume into a mix of two
models; the weights digest also goes into every output row (`prior_model` etc.).

- A local directory (and the tiny model): sha256 over every file `from_pretrained` reads
  (safetensors, configs, vocabularies). File digests are cached by (size, mtime) in
  `cache_dir/digests/`, so a 5 GB decoder is hashed once, not on every run.
- A remote directory: its listing with ETags / checksums (model_cache.remote_listing), which is
  what the per-node mirror is verified against; nothing is downloaded.
- A hub id: the snapshot in the local Hugging Face cache if there is one, else the id alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

from .config import ModelConfig
from .model_cache import COPIED, is_remote, remote_listing
from .storage import redact_url

# Libraries whose version can change pixels: the maths (torch), the pipelines' semantics
# (diffusers, transformers) and the encoders (Pillow: PNG/JPEG/WebP bytes, resizing).
LIBRARIES = ("torch", "diffusers", "transformers", "Pillow")
PARTS = ("prior", "decoder", "depth")  # Kandinsky 2.2's; a family names its own


def library_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in LIBRARIES}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def directory_digest(path: str | os.PathLike, cache_dir: str | os.PathLike) -> str:
    """sha256 over (relative path, sha256) of every model file below `path`, hidden files skipped."""
    root = Path(path).resolve()
    cache_file = Path(cache_dir).expanduser() / "digests" / (hashlib.sha256(str(root).encode()).hexdigest()[:16] + ".json")
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    files, fresh = {}, {}
    for file in sorted(root.rglob("*")):
        rel = file.relative_to(root)
        if not file.is_file() or file.suffix.lower() not in COPIED or any(p.startswith(".") for p in rel.parts):
            continue
        stat = file.stat()
        key = f"{stat.st_size}:{stat.st_mtime_ns}"
        entry = cached.get(str(rel))
        sha = entry["sha256"] if entry and entry.get("stat") == key else _file_sha256(file)
        fresh[str(rel)] = {"stat": key, "sha256": sha}
        files[str(rel)] = sha
    if fresh != cached:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(fresh))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only cache only costs the hashing next time
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _hub_snapshot(repo_id: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached, not a repo id: nothing local to hash
        return None


def weights_digest(source: str, part: str, cache_dir: str, storage_options: dict | None = None) -> str:
    """The identity of the weights behind a model source: hex sha256, or 'unresolved' for a hub id
    that is not in the local Hugging Face cache."""
    from .models import resolve_source

    if is_remote(source):
        listing = remote_listing(source, storage_options, require_index=part != "depth")
        return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
    local = resolve_source(source, part, cache_dir, storage_options)
    if not Path(local).exists():
        local = _hub_snapshot(local)
        if local is None:
            return "unresolved"
    return directory_digest(local, cache_dir)


def weights_digests(model: ModelConfig, storage_options: dict | None = None,
                    parts: tuple[str, ...] = PARTS) -> dict[str, str]:
    """{part: digest} of the model parts a job's family reads (families.Family.parts)."""
    return {part: weights_digest(getattr(model, part), part, model.cache_dir, storage_options) for part in parts}


def model_identity(model: ModelConfig, digests: dict[str, str]) -> dict[str, str]:
    """What every output row records about its weights: the source as configured (the URL, not the
    node's cache path, without any user:password@) and the first 16 hex chars of its digest."""
    return {f"{part}_model": f"{redact_url(getattr(model, part))}@{digests[part][:16]}"
            for part in digests}
