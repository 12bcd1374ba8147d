"""`kandinsky-batch stage-model SRC DEST`: copy a local model directory to object storage, once.

SRC is a diffusers pipeline directory (model_index.json: a prior or decoder) or a transformers
model directory (config.json: the depth estimator), such as a Hugging Face snapshot folder
(`~/.cache/huggingface/hub/models--.../snapshots/<rev>/`, whose files are links into blobs/: the
linked content is copied). DEST is any fsspec URL (`s3://bucket/models/kandinsky-2-2-prior`).

What is copied is what the engine reads back from a remote model directory (model_cache.py):
safetensors weights and config, tokenizer and processor files, never pickle weights, and a folder
whose only weights are pickles is refused before anything is uploaded. The same listing function
selects the files on both sides, so a staged directory mirrors exactly as its source would.

- The index (model_index.json, or config.json for a transformers model) is uploaded last: a copy
  that stops halfway has none, and a job refuses it instead of loading half a model.
- DEST may not hold other model files (an older version's shards would be read with the new
  ones): stage each version under its own prefix.
- After the upload DEST is listed and every file's size compared with SRC's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from kandinsky_engine.model_cache import COPIED, ModelSourceError, remote_listing
from kandinsky_engine.storage import ensure_dir, redact, redact_url, url_to_fs

log = logging.getLogger("kandinsky_engine")


@dataclass
class Staged:
    files: int
    bytes: int
    index: str  # the file uploaded last
    skipped: list[str]  # files of SRC that are not copied (pickle weights, docs, hidden folders)


def stage_model(src: str, dest: str, storage_options: dict | None = None) -> Staged:
    root = Path(src).expanduser().resolve()
    if not root.is_dir():
        raise ModelSourceError(f"{src} is not a directory")
    index = "model_index.json" if (root / "model_index.json").is_file() else "config.json"
    if not (root / index).is_file():
        raise ModelSourceError(f"{src} is neither a diffusers pipeline directory (model_index.json) nor a "
                               "transformers model directory (config.json)")
    pipeline = index == "model_index.json"
    # The engine's own selection: refuses pickle-only folders, skips hidden ones (a download's .cache/).
    listing = remote_listing(str(root), None, require_index=pipeline)
    sizes = {rel: meta["size"] for rel, meta in listing.items()}
    skipped = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                     if p.is_file() and str(p.relative_to(root)) not in sizes)

    name = redact_url(dest)
    fs, base = url_to_fs(dest, storage_options)
    base = base.rstrip("/")
    try:
        stale = sorted(rel for rel in _existing(fs, base) if rel not in sizes and rel.lower().endswith(COPIED))
    except Exception as exc:
        raise ModelSourceError(redact(f"{name}: cannot list ({type(exc).__name__}: {exc})", storage_options)) from None
    if stale:
        raise ModelSourceError(f"{name} already holds model files that {src} does not have ({', '.join(stale[:5])}"
                               f"{', ...' if len(stale) > 5 else ''}); a job would read them with the new ones. "
                               "Stage each model version under its own prefix")

    rels = sorted(rel for rel in sizes if rel != index)
    total = sum(sizes.values())
    log.info("staging %s: %d files (%.1f MB) to %s", src, len(sizes), total / 1e6, name)
    try:
        for folder in sorted({f"{base}/{rel}".rsplit("/", 1)[0] for rel in sizes}):
            ensure_dir(fs, folder)  # a local DEST (a shared volume) needs its folders; object stores none
        # Lists, not a loop: async filesystems (s3fs, gcsfs) upload the files concurrently.
        fs.put([str(root / rel) for rel in rels], [f"{base}/{rel}" for rel in rels])
        fs.put_file(str(root / index), f"{base}/{index}")
    except Exception as exc:
        raise ModelSourceError(redact(f"{name}: upload failed ({type(exc).__name__}: {exc}); "
                                      "run the same command again", storage_options)) from None
    staged = remote_listing(dest, storage_options, require_index=pipeline)
    wrong = sorted(rel for rel in sizes if staged.get(rel, {}).get("size") != sizes[rel])
    if wrong or staged.keys() != sizes.keys():
        raise ModelSourceError(f"{name}: after the upload these files differ from {src}: "
                               f"{', '.join(wrong or sorted(staged.keys() ^ sizes.keys()))}; run the same command again")
    return Staged(files=len(sizes), bytes=total, index=index, skipped=skipped)


def _existing(fs, base: str) -> list[str]:
    fs.invalidate_cache(base)
    prefix = base + "/"
    return [path[len(prefix):] for path in fs.find(base) if path.startswith(prefix)]
