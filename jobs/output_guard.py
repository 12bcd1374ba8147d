"""What a job may do to its output path, checked in the driver before Ray starts.

An output path is one typo away from something precious: a bucket's root, a folder that holds
the manifest and the config, a bucket that does not exist. The job refuses those, naming the path:

- a path with a glob character (* ? [ ]): storage tools expand them, so a delete could reach
  other folders (kandinsky_engine.storage.refuse_glob);
- an object store's bucket root (s3://bucket): a job writes under a prefix, never a whole bucket;
- a missing bucket: never created (s3fs's makedirs would make one, see storage.ensure_dir);
- an output at or below the manifest's location: a rerun would read the job's own shards as
  manifest rows;
- a local output that is a file;
- with --overwrite, a folder that holds the manifest or the config, or that this tool did not
  write (it has files and no _RUN.json); --overwrite-unowned takes such a folder anyway.

Overwriting removes the entries the layout names (kandinsky_engine.pipelines.output.OWNED_ENTRIES; a README.md only
if it is the tool's generated dataset card) and nothing else, never the root itself: on a versioned bucket, s3fs's recursive rm of a bucket path deletes
every version and the bucket with its policy and lifecycle rules.
"""

from __future__ import annotations

import glob
import logging
import os
from itertools import takewhile

from fsspec.implementations.local import LocalFileSystem

from kandinsky_engine.config import JobConfig
from kandinsky_engine.storage import is_object_store, redact_url, refuse_glob, remove_tree, url_to_fs
from kandinsky_engine.pipelines.output import CARD, LEASE, MANIFESTS, OWNED_ENTRIES, RUN_FILE

log = logging.getLogger("kandinsky_engine")
# For messages: "data/, errors/, _tmp/, _damaged/, _runs/, _SUCCESS.json, _RUN.json" (folders first).
OWNED_TEXT = ", ".join([f"{e}/" for e in OWNED_ENTRIES if "." not in e] + [e for e in OWNED_ENTRIES if "." in e])


class OutputRefused(ValueError):
    """The output path cannot be used as asked; the message names it and says why."""


def check_output(config: JobConfig, *, overwrite: bool = False, unowned: bool = False,
                 config_file: str | None = None) -> None:
    """Refuse an output that the job must not write to (or, with `overwrite`, replace). Read-only.

    `unowned` (--overwrite-unowned) lets an overwrite take a folder that holds the manifest or the
    config, or that this tool did not write; `config_file`: the job's YAML, protected like the
    manifest."""
    path = config.output.path.rstrip("/")
    name = redact_url(path)
    try:
        refuse_glob(path)
    except ValueError as exc:
        raise OutputRefused(str(exc)) from None
    fs, root = url_to_fs(path, config.storage_options)
    fs.invalidate_cache(root)  # filesystems are shared: judge the store as it is now
    if is_object_store(fs):
        check_bucket(fs, root, name)
    elif fs.isfile(root):
        raise OutputRefused(f"output.path {name} is a file; it must be a folder (or not exist yet)")
    manifest = manifest_location(config.input.manifest, config.storage_options)
    if within(path, manifest, config.storage_options):
        raise OutputRefused(
            f"output {name} is inside the manifest location {redact_url(manifest)}: a rerun would read the job's "
            "own shards as manifest rows; choose an output.path outside it")
    if not overwrite or is_empty(fs, root):
        return
    protected = {"manifest": manifest, "config file": config_file}
    for what, url in protected.items():
        if not url or not within(url, path, config.storage_options):
            continue
        removed = (e for e in OWNED_ENTRIES if e != MANIFESTS)  # what remove_owned removes
        entry = next((e for e in removed if within(url, f"{path}/{e}", config.storage_options)), None)
        if entry:  # even --overwrite-unowned would delete it
            raise OutputRefused(f"the {what} {redact_url(url)} is inside {name}/{entry}, which --overwrite "
                                "deletes; move it out of the output first")
        if not unowned:
            raise OutputRefused(
                f"output {name} holds the {what} {redact_url(url)}: --overwrite refuses a folder with the job's "
                f"own files; choose another output.path, or pass --overwrite-unowned to remove only {OWNED_TEXT} "
                "there and keep every other file")
    if not unowned and not fs.exists(f"{root}/{RUN_FILE}"):
        raise OutputRefused(
            f"output {name} is not empty and holds no {RUN_FILE}: this tool did not write it, and --overwrite "
            f"replaces only its own outputs; choose another output.path, or pass --overwrite-unowned to remove "
            f"only {OWNED_TEXT} there and keep every other file")


def check_bucket(fs, root: str, name: str) -> None:
    """Refuse a bucket-root output and a missing bucket."""
    bucket, _, key = root.strip("/").partition("/")
    if not key:
        raise OutputRefused(f"output.path {name} is the root of bucket {bucket!r}: a job writes under a prefix "
                            f"(e.g. {name}/out), never to a whole bucket")
    try:
        fs.info(bucket)  # s3fs: HeadBucket
    except FileNotFoundError:
        raise OutputRefused(f"output {name}: bucket {bucket!r} does not exist; this tool never creates buckets "
                            "(a typo would make a new one): create it or fix output.path") from None
    except PermissionError:
        # HeadBucket needs s3:ListBucket on the whole bucket, which a role allowed to write only
        # under a prefix may lack: a refusal says nothing about whether the bucket exists. Go on;
        # the output's own listing comes next and stops the job with the URL if it is refused too.
        log.info("output %s: not allowed to check that bucket %r exists; going on", name, bucket)


def manifest_location(url: str, storage_options: dict | None = None) -> str:
    """Where a manifest is listed from: the path as given, or for a glob (a path that does not
    exist as given, see manifest.find_files) the folder before its first wildcard."""
    fs, path = url_to_fs(url, storage_options)
    if not glob.has_magic(path) or fs.exists(path):
        return url
    fixed = "/".join(takewhile(lambda part: not glob.has_magic(part), path.split("/")))
    return fs.unstrip_protocol(fixed) if "://" in url else fixed


def within(url: str, folder: str, storage_options: dict | None = None) -> bool:
    """Whether `url` is `folder` or below it (same filesystem; local paths with symlinks resolved)."""
    (proto, path), (folder_proto, folder_path) = _place(url, storage_options), _place(folder, storage_options)
    return proto == folder_proto and (path == folder_path or path.startswith(folder_path + "/"))


def _place(url: str, storage_options: dict | None) -> tuple[str, str]:
    fs, path = url_to_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        path = os.path.realpath(path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]  # s3a:// is s3://
    return protocol, path.rstrip("/")


def is_empty(fs, root: str) -> bool:
    """A missing or empty folder, or on an object store one that holds only directory markers:
    the zero-byte `out/` keys that web consoles and some tools create as folders (s3fs lists one
    under the folder's own name with a trailing slash)."""
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return True
    return all((is_object_store(fs) and _is_marker(entry, root)) or _before_the_run(entry) for entry in entries)


def _before_the_run(entry: dict) -> bool:
    """What a run writes before `_RUN.json`, so that a killed run can leave it in an output that is
    otherwise empty: its lease, and the Parquet copies of text manifests (content-named)."""
    return entry["name"].rstrip("/").rsplit("/", 1)[-1] in (LEASE, MANIFESTS)


def _is_marker(entry: dict, root: str) -> bool:
    name = entry["name"]
    return entry.get("size") == 0 and (name.endswith("/") or name.rstrip("/") == root.rstrip("/"))


def remove_owned(fs, root: str) -> list[str]:
    """Remove this tool's entries under `root`, in OWNED_ENTRIES order, and nothing else; but
    `_manifests/`, copies of the job's input named by their content, which the run that
    overwrites has just made (kandinsky_engine/text_manifest.py), and a README.md that this tool
    did not write (pipelines/card.py)."""
    from kandinsky_engine.pipelines.card import card_is_ours

    removed = []
    for entry in (e for e in OWNED_ENTRIES if e != MANIFESTS):
        if entry == CARD and not card_is_ours(fs, root):
            continue
        if remove_tree(fs, f"{root}/{entry}"):
            removed.append(entry)
    log.info("--overwrite: removed %s from %s", ", ".join(removed) or "nothing", redact_url(root))
    return removed
