"""`kandinsky-batch status OUTPUT [--json]`: where a job stands, running or not, from any machine.

It reads only small files, never data/: `_SUCCESS.json` (counts of a finished run), `_RUN.json`,
`_LEASE.json`, the run reports and progress files in `_runs/` (one of each per run), the footer of
`_index.parquet` (its row count, not its rows), and the small columns of at most
`max_error_shards` error shards (errors/ only holds units with failed rows). So its cost does not
grow with the number of data shards: on S3, about ten requests plus one per run file and per error
shard read, whether data/ holds a hundred shards or a million.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq

from kandinsky_engine.storage import access_checked, redact_url, refuse_glob, url_to_fs
from kandinsky_engine.pipelines.output import ERRORS, INDEX, LEASE, RUN_FILE, RUNS, SUMMARY

from .lease import owner_died_here
from .progress import PROGRESS_SUFFIX, clock

MAX_ERROR_SHARDS = 200
EXAMPLES = 3  # example messages per (stage, error type)


def _json(fs, path: str) -> dict | None:
    try:
        value = json.loads(fs.cat_file(path))
        return value if isinstance(value, dict) else None
    except FileNotFoundError:
        return None
    except ValueError:  # torn (a killed write of a non-atomic store) or foreign: shown as absent
        return None


def read_status(path: str, storage_options: dict | None = None, max_error_shards: int = MAX_ERROR_SHARDS) -> dict:
    """Everything `status` and `report` show, as one JSON-able dict."""
    path = path.rstrip("/")
    refuse_glob(path, "output")
    fs, root = url_to_fs(path, storage_options)
    with access_checked(path, storage_options, "reading output"):
        return _read(fs, root, path, max_error_shards)


def _read(fs, root: str, path: str, max_error_shards: int) -> dict:
    fs.invalidate_cache()  # a running job changes these files: never a cached listing
    summary, run_file, lease = (_json(fs, f"{root}/{name}") for name in (SUMMARY, RUN_FILE, LEASE))
    if run_file is None and summary is None:
        raise FileNotFoundError(f"{redact_url(path)}: no {RUN_FILE} or {SUMMARY}: not an output of this tool "
                                "(or its job has not started)")
    try:
        names = [e for e in fs.ls(f"{root}/{RUNS}", detail=False)]
    except FileNotFoundError:
        names = []
    with ThreadPoolExecutor(8) as pool:
        files = dict(zip(names, pool.map(lambda n: _json(fs, n) if n.endswith((".json", PROGRESS_SUFFIX)) else None, names)))
    reports = sorted((r for n, r in files.items() if not n.endswith(PROGRESS_SUFFIX) and r and "finished_at" in r),
                     key=lambda r: r["finished_at"])
    progress = sorted((p for n, p in files.items() if n.endswith(PROGRESS_SUFFIX) and p and "run" in p),
                      key=lambda p: p.get("started_at", ""))
    finished = {r["run"] for r in reports}
    current = progress[-1] if progress and progress[-1]["run"] not in finished else None
    now = time.time()
    status = {
        "output": redact_url(path),
        "state": _state(summary, current, lease, now),
        "manifest_rows": (summary or {}).get("manifest_rows"),
        "lease": _lease(lease, now),
        "runs": [{k: v for k, v in r.items() if k != "records"} for r in reports],
        "progress": progress,
        "current": _current(current, now),
        "failures": _failures(fs, root, max_error_shards),
    }
    if summary:
        status.update({k: summary.get(k) for k in ("complete", "limit", "rows", "failed_rows", "shards",
                                                  "error_shards", "finished_at")})
    else:  # running or stopped: what the last progress write saw, and the shards the last finished run indexed
        status.update({"complete": False, "rows": None, "failed_rows": None, "shards": None, "error_shards": None,
                       "committed": current and current.get("committed"), "total": current and current.get("total"),
                       "failed_this_run": current and current.get("failed"),
                       "units_committed_this_run": current and current.get("units_committed"),
                       "shards_indexed": _index_rows(fs, root)})
    return status


def _state(summary, current, lease, now) -> str:
    if lease is not None and lease.get("expires_at_epoch", 0) > now and not owner_died_here(lease):
        if current is not None and now - current.get("updated_at_epoch", now) > max(3 * current.get("interval_s", 10), 60):
            return ("running? (no progress written for a while: stalled, or killed on another machine; its lease "
                    f"expires at {lease.get('expires_at')})")
        return "running"
    if current is not None:
        return "stopped (killed or lost before its end: rerun the same command to resume)"
    if summary:
        return "complete" if summary.get("complete") else f"partial (--limit {summary.get('limit')})"
    return "not finished (no run reached its end: rerun the same command to resume)"


def _lease(lease: dict | None, now: float) -> dict | None:
    if lease is None:
        return None
    keep = ("host", "pid", "started_at", "heartbeat_at", "expires_at")
    return {**{k: lease.get(k) for k in keep}, "expired": lease.get("expires_at_epoch", 0) <= now,
            "owner_gone": owner_died_here(lease)}  # its process ended on this machine: a rerun takes it over


def _current(progress: dict | None, now: float) -> dict | None:
    if progress is None:
        return None
    keep = ("run", "state", "host", "pid", "started_at", "updated_at", "committed", "total", "failed",
            "images_per_s", "eta_s", "units_committed", "failures", "log")
    return {**{k: progress.get(k) for k in keep}, "updated_s_ago": round(now - progress.get("updated_at_epoch", now), 1)}


def _index_rows(fs, root: str) -> int | None:
    """Shards (data and errors) recorded by the last finished run: the index footer's row count."""
    try:
        with fs.open(f"{root}/{INDEX}", "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    except Exception:
        return None


def error_rows(fs, root: str, max_shards: int = MAX_ERROR_SHARDS) -> tuple[list[str], list[str], list[dict], list[str]]:
    """(error shards, those read, their rows' id, stage, error_type and message, damaged shards):
    at most `max_shards` shards, evenly spread over the job."""
    fs.invalidate_cache()
    try:
        shards = sorted(e for e in fs.find(f"{root}/{ERRORS}") if e.endswith(".parquet"))
    except FileNotFoundError:
        shards = []
    read = shards[:: max(1, -(-len(shards) // max_shards))][:max_shards]  # evenly spread over the job

    damaged = []

    def columns(name):
        try:
            with fs.open(name, "rb") as f:
                return pq.read_table(f, columns=["id", "stage", "error_type", "message"]).to_pylist()
        except Exception as exc:  # torn, foreign or vanished: named, and the others are still read
            damaged.append(f"{name.removeprefix(root + '/')} ({type(exc).__name__}: {printable(exc, 120)})")
            return []

    with ThreadPoolExecutor(8) as pool:
        rows = [row for table in pool.map(columns, read) for row in table]
    return shards, read, rows, damaged


def _failures(fs, root: str, max_shards: int) -> dict:
    """Failed rows by stage and error type, with example messages, from errors/ (its small columns)."""
    shards, read, rows, damaged = error_rows(fs, root, max_shards)
    counts = Counter((r["stage"], r["error_type"]) for r in rows)
    groups = []
    for (stage, kind), n in counts.most_common():
        examples = [{"id": r["id"], "message": r["message"]} for r in rows
                    if (r["stage"], r["error_type"]) == (stage, kind)][:EXAMPLES]
        groups.append({"stage": stage, "error_type": kind, "rows": n, "examples": examples})
    return {"error_shards": len(shards), "error_shards_read": len(read), "rows_read": len(rows), "groups": groups,
            "damaged": sorted(damaged)}


# -- text ---------------------------------------------------------------------------------------

def printable(text, limit: int = 160) -> str:
    """A user value (id, prompt, message) safe for a terminal: control characters (ANSI escapes
    included) shown escaped, long values cut."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_status(s: dict) -> str:
    lines = [f"output: {s['output']}", f"state: {s['state']}"]
    if s.get("rows") is not None:
        lines.append(f"rows: {s['rows']} in data/, {s['failed_rows']} in errors/ (manifest: {s['manifest_rows']}); "
                     f"shards: {s['shards']} data, {s['error_shards']} errors")
    elif s.get("committed") is not None:
        lines.append(f"rows: {s['committed']} of {s['total']} committed at the last progress write "
                     f"({s['failed_this_run']} failed in this run); units committed by this run: "
                     f"{s['units_committed_this_run']}; shards indexed by the last finished run: {s['shards_indexed']}")
    current = s.get("current")
    if current:
        speed = "?" if current["images_per_s"] is None else f"{current['images_per_s']:.2f}"
        lines.append(f"run {current['run']} ({current['state']}, host {printable(current['host'])}, pid "
                     f"{current['pid']}): {speed} images/s over the last minute, ETA {clock(current['eta_s'])}, "
                     f"updated {current['updated_s_ago']:.0f} s ago")
    lease = s.get("lease")
    if lease:
        lines.append(f"lease: host {printable(lease['host'])}, pid {lease['pid']}, since {lease['started_at']}, "
                     f"until {lease['expires_at']}{' (expired)' if lease['expired'] else ''}"
                     f"{' (its process is gone)' if lease['owner_gone'] else ''}")
    else:
        lines.append("lease: none (no run is writing)")
    failures = s["failures"]
    if failures["groups"]:
        sampled = (f", from {failures['error_shards_read']} of {failures['error_shards']} error shards"
                   if failures["error_shards_read"] < failures["error_shards"] else "")
        lines.append(f"failures ({failures['rows_read']} rows{sampled}):")
        for g in failures["groups"]:
            example = g["examples"][0]
            lines.append(f"  {g['stage']}: {g['error_type']}: {g['rows']} row(s), e.g. id {printable(example['id'], 60)}: "
                         f"{printable(example['message'])}")
    for name in failures["damaged"]:
        lines.append(f"unreadable error shard (skipped; a rerun rewrites it): {name}")
    for r in s["runs"]:
        speed = "-" if r.get("images_per_s") is None else f"{r['images_per_s']:.2f}"
        lines.append(f"run {r['run']} finished {r['finished_at']}: {r['rows_computed']} computed, {r['rows_skipped']} "
                     f"skipped, {r['rows_retried']} retried, {r['wall_time_s']:.1f} s, {speed} images/s, "
                     f"{r.get('oom_splits', 0)} OOM splits")
    return "\n".join(lines)
