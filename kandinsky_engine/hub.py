"""Hugging Face hub ids as model sources: which commit a source names.

A hub id (`kandinsky-community/kandinsky-2-2-prior`, optionally `...@revision`) names a branch or
tag that can move. The run fingerprint records the commit it resolved to (`resolve_commit`), so a
job never resumes into other weights without saying so: from the hub when it can be reached, else
from the local Hugging Face cache (`HF_HUB_OFFLINE=1` asks for the cache only). A source that can
be resolved neither way is an error naming it, never a guess.
"""

from __future__ import annotations

import os
import re

COMMIT = re.compile(r"[0-9a-f]{40}")
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_TIMEOUT_S = 10.0
OFFLINE_HINT = (" (without a network, set HF_HUB_OFFLINE=1: hub ids are then read from the local cache only, "
                "without retries)")


class HubUnavailable(RuntimeError):
    """A hub id whose commit can be had neither from the hub nor from the local cache."""


def split_revision(source: str) -> tuple[str, str | None]:
    """`repo@revision` -> (repo, revision); a plain repo id -> (repo, None)."""
    repo, sep, revision = source.partition("@")
    return repo, (revision or None) if sep else None


def is_hub_id(source: str) -> bool:
    """Whether `source` reads as a hub repo id (`owner/name`, optionally `@revision`) rather than a
    path: callers check local paths and URLs first."""
    return REPO_ID.fullmatch(split_revision(source)[0]) is not None and not source.startswith((".", "/", "~"))


def is_hub_source(source: str) -> bool:
    """A model source that names a hub repo: not a URL, the tiny model or an existing local path."""
    return ("://" not in source and not source.startswith("tiny") and not os.path.exists(os.path.expanduser(source))
            and is_hub_id(source))


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cached_commit(repo: str, revision: str) -> str | None:
    """The commit of `revision` in the local Hugging Face cache, if the cache has it."""
    try:
        from huggingface_hub import snapshot_download

        return os.path.basename(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # not cached (or not a repo id): nothing local
        return None


def resolve_commit(source: str, default_revision: str | None = None) -> str:
    """The 40-hex commit that hub id `source` names now (its own `@revision`, else
    `default_revision`, else `main`)."""
    repo, revision = split_revision(source)
    revision = revision or default_revision or "main"
    if COMMIT.fullmatch(revision):
        return revision
    problem = "HF_HUB_OFFLINE is set"
    if not offline():
        try:
            from huggingface_hub import HfApi

            return HfApi().model_info(repo, revision=revision, timeout=HUB_TIMEOUT_S).sha
        except Exception as exc:  # no network, unknown repo or revision, gated repo
            problem = f"the hub answered {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    commit = cached_commit(repo, revision)
    if commit is None:
        raise HubUnavailable(
            f"cannot tell which weights hub model {repo!r} (revision {revision!r}) names: {problem}, and the local "
            "Hugging Face cache has no snapshot of it. Give a reachable hub, download it once "
            f"(`huggingface-cli download {repo}`), or point the model at a local or s3:// directory"
            + ("" if offline() else OFFLINE_HINT))
    return commit


def pin(model, parts: tuple[str, ...]):
    """`model` (a ModelConfig) with each hub id among `parts` as `repo@commit`: what the driver
    fingerprints, every actor loads, and every row's *_model column names."""
    update = {}
    for part in parts:
        source = getattr(model, part)
        if is_hub_source(source):
            update[part] = f"{split_revision(source)[0]}@{resolve_commit(source, model.revision)}"
    return model.model_copy(update=update) if update else model


def snapshot(source: str, weights: bool, default_revision: str | None = None) -> str:
    """The local folder of hub id `source` at its commit, downloaded once per machine into the Hugging
    Face cache (which locks it against concurrent downloads): the files the engine reads, safetensors
    weights only (`weights=False`: configs, tokenizers and processors alone, for the driver)."""
    from huggingface_hub import snapshot_download

    from .model_cache import COPIED

    repo, _ = split_revision(source)
    commit = resolve_commit(source, default_revision)
    patterns = [f"*{suffix}" for suffix in COPIED if weights or suffix != ".safetensors"]
    try:
        return snapshot_download(repo, revision=commit, allow_patterns=patterns)
    except Exception as exc:
        raise HubUnavailable(f"cannot download hub model {repo!r} at commit {commit}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]}{OFFLINE_HINT}") from None
