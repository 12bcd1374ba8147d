"""The run's exit codes as schedulers read them (jobs/outcome.py): failed rows finish the job (0)
unless --fail-on-row-errors or output.max_failed_fraction says otherwise (1); a bounded wait for
the output's lease (--wait-timeout) ends in exit 3's LeaseHeld. Offline: no Ray."""

from __future__ import annotations

import time

import pytest

from kandinsky_engine.jobs.outcome import run_exit_code


def summary(rows: int, failed: int) -> dict:
    return {"rows": rows, "failed_rows": failed, "output": "s3://b/out"}


@pytest.mark.parametrize("rows, failed, bound, strict, code", [
    (100, 0, None, False, 0),
    (100, 0, 0.0, True, 0),
    (99, 1, None, False, 0),      # a finished job: its failed rows are in errors/, a rerun retries them
    (99, 1, None, True, 1),       # --fail-on-row-errors
    (99, 1, 0.05, False, 0),      # 1% failed, 5% allowed
    (90, 10, 0.05, False, 1),     # 10% failed, 5% allowed
    (95, 5, 0.05, False, 0),      # exactly the bound: allowed
    (0, 4, 1.0, False, 0),
])
def test_exit_code_mapping(rows, failed, bound, strict, code):
    got, message = run_exit_code(summary(rows, failed), bound, strict)
    assert got == code
    if failed:
        assert message.startswith(f"{failed} row(s) failed: see s3://b/out/errors/")
        assert ("exit code 1:" in message) == (code == 1)
    else:
        assert message is None


def test_max_failed_fraction_is_a_documented_bounded_field():
    from pydantic import ValidationError

    from kandinsky_engine.config import OutputConfig

    field = OutputConfig.model_fields["max_failed_fraction"]
    assert field.default is None and "exits 1" in field.description
    assert OutputConfig(path="o", max_failed_fraction=0.25).max_failed_fraction == 0.25
    with pytest.raises(ValidationError):
        OutputConfig(path="o", max_failed_fraction=1.5)


def test_cli_options_parse():
    from kandinsky_engine.jobs.cli import build_parser
    from kandinsky_engine.jobs.outcome import wait_of

    args = build_parser().parse_args(["run", "job.yaml", "--wait-timeout", "300", "--if-busy", "skip",
                                      "--fail-on-row-errors"])
    assert (wait_of(args), args.if_busy, args.fail_on_row_errors) == (300.0, "skip", True)
    args = build_parser().parse_args(["run", "job.yaml", "--wait"])
    assert (wait_of(args), args.if_busy, args.fail_on_row_errors) == (True, "fail", False)


def test_wait_timeout_bounds_the_wait_for_a_live_lease(tmp_path):
    """A live run's lease (renewed) is waited for at most --wait-timeout's seconds, then LeaseHeld
    (exit 3); an expired one (its run crashed) is taken over within the wait."""
    from kandinsky_engine.jobs.lease import Lease, LeaseHeld
    from kandinsky_engine.storage import url_to_fs

    fs, root = url_to_fs(str(tmp_path))
    holder = Lease(fs, root, 30, root)
    holder.acquire()
    started = time.monotonic()
    with pytest.raises(LeaseHeld, match="waited 1 s"):
        Lease(fs, root, 30, root).acquire(wait=1.0, poll_s=0.2)
    assert 1.0 <= time.monotonic() - started < 10
    holder._stop.set()  # the holder stops renewing (as a crashed driver): its 1 s lease expires
    short = Lease(fs, root, 1, root)
    holder.release()
    short.acquire()
    short._stop.set()  # dies without releasing; another host's run would wait for the expiry
    started = time.monotonic()
    taker = Lease(fs, root, 30, root)
    taker.acquire(wait=10.0, poll_s=0.2)
    taker.release()
    assert time.monotonic() - started < 10
