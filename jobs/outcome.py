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
"""

from __future__ import annotations


def run_exit_code(summary: dict, max_failed_fraction: float | None, fail_on_row_errors: bool = False) -> tuple[int, str | None]:
    """(exit code, message for stderr) of a finished run, from its summary (`_SUCCESS.json`)."""
    failed = summary["failed_rows"]
    if not failed:
        return 0, None
    scope = summary["rows"] + failed
    share = failed / scope
    bound = 0.0 if fail_on_row_errors else max_failed_fraction
    where = f"{failed} row(s) failed: see {summary['output']}/errors/ (rerun the same command to retry them)"
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
