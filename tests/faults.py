"""Helpers for the fault tests: find stage actors in Ray's actor table, read back output ids.

The actor table is read from the GCS (`ray._private.state.actors`, a DeveloperAPI) rather than
`ray.util.state.list_actors`, because the latter needs the dashboard (Ray's `default` extra),
which the test clusters do not start.
"""

from __future__ import annotations

import glob
import threading
from collections import Counter

import psutil  # installed with accelerate


def stage_actors(stage: str, states=("ALIVE",)) -> list[dict]:
    """Actors of one stage's pool, e.g. stage='DecoderStage' (pools are named `MapBatches(DecoderStagePool)`)."""
    from ray._private.state import actors

    return [a for a in actors().values()
            if f"({stage}Pool)" in a["ActorClassName"] and a["State"] in states]


def decoder_busy(process_title: str) -> bool:
    """A Ray worker's process title names the task it runs: `ray::MapWorker(MapBatches(DecoderStagePool)).submit`
    while the decoder actor works on a block, `ray::MapWorker(MapBatches(DecoderStagePool))` between blocks."""
    return "(DecoderStagePool)" in process_title and process_title.endswith(".submit")


def title(pid: int) -> str:
    """A process's title ('' once it is gone): Ray renames a worker after the task it is running."""
    try:
        return " ".join(psutil.Process(pid).cmdline()).strip()
    except psutil.Error:
        return ""


def ids_in(folder: str) -> list[str]:
    """Every row id in the shards folder/*/*.{parquet,tar} (a folder per manifest file), read by the
    shard format's own reader (pipelines/shards.py), duplicates kept (hidden .tmp- files are not
    matched, as for any reader)."""
    from kandinsky_engine.pipelines.shards import format_of

    paths = sorted(glob.glob(f"{folder}/*/*.parquet") + glob.glob(f"{folder}/*/*.tar"))
    ids = []
    for path in paths:
        with open(path, "rb") as f:
            ids += format_of(path).ids(f)
    return ids


def duplicated(ids: list[str]) -> dict[str, int]:
    return {i: n for i, n in Counter(ids).items() if n > 1}


class Background(threading.Thread):
    """Runs fn in a thread and keeps its result or exception for the test to inspect."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as exc:  # reported by the test
            self.error = exc
