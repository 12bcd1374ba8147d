"""What a run's exit code says, for people and for schedulers (KubeRay, CronJobs, Airflow...).

| code | meaning | Ray job | RayJob (backoffLimit) |
|---|---|---|---|
| 0 | the job finished: every row of its scope is in data/ or errors/, and the failed share is within `output.max_failed_fraction` (no bound by default); or `--if-busy skip` found another run writing the output | SUCCEEDED | Complete / SUCCEEDED: no retry |
| 1 | the job finished, but more rows failed than allowed (`--fail-on-row-errors`: any; `max_failed_fraction`) | FAILED | retried on a new cluster, which reruns only the failed rows |
| 2 | the job could not run (config, manifest, access, resources, GPU memory, a Ray error) | FAILED | retried: helps transient faults (storage, a lost node), not a wrong config |
| 3 | another run holds the output's lease (after `--wait-timeout`, if given): nothing was done | FAILED | retried |
| 15 | stopped by SIGTERM (`ray job stop`, a pod deleted): the lease is released on the way out | STOPPED (or FAILED) | not retried when stopped |

A row that fails is a fact about the row (a corrupt input, an impossible parameter), not about the
run: rerunning the same command retries it, and the job is otherwise done. So failed rows alone do
not fail the run, and a scheduler does not start a new GPU cluster for them.

What the message advises depends on why rows failed (`needs_fixing`). A rerun retries every failed
row, but only some failures can pass on a rerun: a read that timed out or met an I/O error, a
model stage that raised or ran out of memory (another run may have the memory). A row whose values
are invalid (`InvalidRow`, from validation or parameter resolution), or whose input file is missing,
refused by the input policy, too large, not a regular file or not an image, fails again the same
way until the row or the file changes: for those the advice is to fix them first.
"""

from __future__ import annotations

import re

# fetch_inputs failures that the same input will give again (kandinsky_engine/images.py, uri_policy.py).
BAD_INPUT = re.compile(r"file not found|not a regular file|is larger than input\.max_input_bytes|refused by |"
                       r"redirects to |: (IsADirectoryError|NotADirectoryError|PermissionError|ValueError|ImportError): ")


def needs_fixing(stage: str, error_type: str, message: str) -> bool:
    """True when rerunning the same command cannot make the row pass (see the module docstring)."""
    if error_type == "InvalidRow":
        return True
    if stage == "fetch_inputs":
        return bool(BAD_INPUT.search(message or ""))
    return error_type in ("ImageInputError", "RedirectRefused")  # decoded by a stage: not an image, too many pixels


def read_failures(output: str, storage_options: dict | None) -> dict | None:
    """{rows, read_all}: the failed rows (stage, error_type, message) of at most 200 error shards
    spread over the output (jobs/status.py), or None if errors/ cannot be read."""
    from kandinsky_engine.storage import url_to_fs

    from .status import error_rows

    try:
        fs, root = url_to_fs(output, storage_options)
        shards, read, rows, damaged = error_rows(fs, root)
    except Exception:  # noqa: BLE001 (the advice is a nicety: the job's result stands without it)
        return None
    return {"rows": rows, "read_all": len(read) == len(shards) and not damaged}


def advice(failures: dict | None) -> str:
    """What to do about failed rows, from a sample of them (`read_failures`)."""
    rerun = "rerun the same command to retry them"
    rows = (failures or {}).get("rows") or []
    bad = [r for r in rows if needs_fixing(r["stage"], r["error_type"], r["message"])]
    if not bad:
        return rerun
    example = f"e.g. id {bad[0]['id']!r}, {bad[0]['stage']}: {_short(bad[0]['message'])}"
    if len(bad) == len(rows):
        return f"bad values or input files, which a rerun fails again: fix them, then rerun; {example}"
    counted = "" if failures.get("read_all") else f" of the {len(rows)} read"
    return (f"{len(rows) - len(bad)}{counted} may pass if you rerun the same command; {len(bad)} with bad values or "
            f"input files fail again until fixed; {example}")


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def run_exit_code(summary: dict, max_failed_fraction: float | None, fail_on_row_errors: bool = False,
                  failures: dict | None = None) -> tuple[int, str | None]:
    """(exit code, message for stderr) of a finished run, from its summary (`_SUCCESS.json`) and
    a sample of its failed rows (`read_failures`; without it the advice is to rerun)."""
    failed = summary["failed_rows"]
    if not failed:
        return 0, None
    scope = summary["rows"] + failed
    share = failed / scope
    bound = 0.0 if fail_on_row_errors else max_failed_fraction
    where = f"{failed} row(s) failed: see {summary['output']}/errors/ ({advice(failures)})"
    if bound is not None and share > bound:
        why = "--fail-on-row-errors" if fail_on_row_errors else f"more than output.max_failed_fraction={bound:g}"
        return 1, f"{where}\nexit code 1: {failed} of {scope} rows ({share:.1%}) failed, {why}"
    return 0, where


def wait_of(args) -> bool | float:
    """`Lease.acquire`'s wait: --wait-timeout's seconds, else --wait (as long as it takes) or none."""
    return args.wait_timeout if args.wait_timeout is not None else args.wait


def add_arguments(run) -> None:
    """`run`'s options for schedulers: a bounded wait for the output's lease, what to do when it stays
    busy, and whether failed rows fail the run."""
    run.add_argument("--wait-timeout", type=float, metavar="S",
                     help="like --wait, for at most S seconds, then exit 3 (a crashed run's lease expires within "
                          "output.lease_ttl_s: a bound above it lets a retry start right after a crash)")
    run.add_argument("--if-busy", choices=["fail", "skip"], default="fail",
                     help="if another run still holds the output's lease (after any wait): fail with exit 3 "
                          "(default), or skip with exit 0 (schedules: the running job covers this tick)")
    run.add_argument("--fail-on-row-errors", action="store_true",
                     help="exit 1 if any row failed (default: exit 0 when the job finished, unless more than "
                          "output.max_failed_fraction of its rows failed)")
