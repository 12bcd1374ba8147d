"""`kandinsky-batch push OUTPUT REPO_ID`: publish a finished output folder as a Hugging Face dataset
repository that `datasets.load_dataset(REPO_ID)` loads.

What goes up is the dataset and nothing else: the card (README.md, with its configs and features),
the shard list and data/ (PUSHED), never errors/, the run's metadata (`_RUN.json`, `_index.parquet`,
`_runs/`: they hold the job config), logs or report.html. One `upload_folder` commit; data files
of the repository that the folder no longer has (shards set aside or recomputed since the last
push) are deleted in that commit, so the repository holds each row once.
"""

from __future__ import annotations

import json
import os

from kandinsky_engine.pipelines.card import card_is_ours
from kandinsky_engine.pipelines.output import CARD, DATA, SHARD_LIST, SUMMARY

PUSHED = [CARD, SHARD_LIST, f"{DATA}/**"]
HIDDEN = [".*", "**/.*"]  # .DS_Store, editors' files


def pushed_files(folder: str) -> list[str]:
    """The files of `folder` that a push uploads, relative to it, chosen by huggingface_hub's own
    filter with the patterns the push passes to `upload_folder`."""
    from huggingface_hub.utils import filter_repo_objects

    names = sorted(os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
                   for d, _, files in os.walk(folder) for f in files)
    return list(filter_repo_objects(names, allow_patterns=PUSHED, ignore_patterns=HIDDEN))


def check_folder(folder: str) -> dict:
    """The folder's `_SUCCESS.json`, once the folder is known to be a finished output with a card
    that `datasets` can load; otherwise a ValueError naming the file."""
    if "://" in folder or not os.path.isdir(folder):
        raise ValueError(f"push {folder}: not a local folder (push uploads a folder on this machine; copy "
                         f"{CARD}, {SHARD_LIST} and {DATA}/ of an object-store output here first)")
    try:
        with open(os.path.join(folder, SUMMARY)) as f:
            summary = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{folder}/{SUMMARY} is missing: the job has not finished; run it to its end, "
                         "then push") from None
    card = os.path.join(folder, CARD)
    if not os.path.isfile(card):
        raise ValueError(f"{card} is missing (a run writes it after {SUMMARY}): rerun the job to write it")
    from fsspec.implementations.local import LocalFileSystem

    if not card_is_ours(LocalFileSystem(), os.path.abspath(folder)):
        with open(card, encoding="utf-8") as f:
            if "\nconfigs:" not in f.read():
                raise ValueError(f"{card} is not this tool's dataset card and declares no `configs`: on the hub, "
                                 f"`datasets` would read every file as rows; delete it and rerun the job, or add "
                                 f"configs with data_files {DATA}/*/*")
    return summary


def push(folder: str, repo_id: str, *, private: bool = False, revision: str | None = None,
         dry_run: bool = False) -> dict:
    """Upload the dataset in `folder` to the dataset repository `repo_id` (created if missing). The
    token is huggingface_hub's (HF_TOKEN or `hf auth login`). `dry_run`: check and list, upload
    nothing. Returns {repo_id, files, url (None for a dry run), complete}."""
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)  # a ValueError naming what is wrong with it, before any request
    summary = check_folder(folder)
    files = pushed_files(folder)
    result = {"repo_id": repo_id, "files": files, "url": None, "complete": bool(summary.get("complete"))}
    if dry_run:
        return result
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="dataset", revision=revision,
                               allow_patterns=PUSHED, ignore_patterns=HIDDEN, delete_patterns=[f"{DATA}/**"],
                               commit_message=f"kandinsky-batch push: {summary.get('rows')} rows")
    return {**result, "url": commit.commit_url}
