"""An output's history: the reports of the runs that reached their end, and the shard records
(rows, bytes, sha256) they committed, which let a rerun trust a shard without reading it.

Each run writes `_runs/{run}.json` (its report) and `_runs/{run}.parquet` (the records of the
shards it committed, adopted or read back: not every shard again), so the history grows with the
shards written, not with runs x shards. The records are read one run at a time into one dict by
file, the newest record of a file winning.
"""

from __future__ import annotations

import json

from kandinsky_engine.pipelines.output import RUNS, read_records


def read_reports(fs, root: str) -> tuple[list[dict], list[str]]:
    """Reports of earlier runs that reached their end, oldest first (a killed run wrote none), and
    the names of damaged reports, which are skipped: their shards are read back instead."""
    reports, damaged = [], []
    fs.invalidate_cache(f"{root}/{RUNS}")
    try:  # listed, not globbed: the root is taken literally
        names = sorted(n for n in fs.ls(f"{root}/{RUNS}", detail=False) if n.endswith(".json"))
    except FileNotFoundError:
        names = []
    for name in names:
        try:
            with fs.open(name, "r") as f:
                report = json.load(f)
            report["finished_at"]  # noqa: B018 (a report without it is not one of ours)
        except (ValueError, KeyError, TypeError):
            damaged.append(f"{RUNS}/{name.rsplit('/', 1)[-1]}")
            continue
        report.pop("records", None)  # reports of older versions held their records inline
        report["run"] = name.rsplit("/", 1)[-1][: -len(".json")]
        reports.append(report)
    return sorted(reports, key=lambda r: r["finished_at"]), damaged


def read_known(fs, root: str, reports: list[dict], damaged: list[str]) -> dict[str, dict]:
    """{file: record} from the reports' record files, oldest first; a missing or torn record file
    is added to `damaged` (its shards are then read back)."""
    known: dict[str, dict] = {}
    for report in reports:
        path = f"{root}/{RUNS}/{report['run']}.parquet"
        try:
            records = read_records(fs, path)
        except Exception:
            damaged.append(f"{RUNS}/{path.rsplit('/', 1)[-1]}")
            continue
        known.update((r["file"], r) for r in records if r.get("sha256"))
    return known
