"""Ctrl-C and SIGTERM: a run stops, gives its lease back, and says in one line where it stands.

KubeRay, CronJobs and `docker stop` send SIGTERM; a person presses Ctrl-C (SIGINT). Either way the
run raises `Interrupted` in the main thread, so that everything on the way out runs as for any
error (the writer stops, the progress file and the lease are written and given back), and the CLI
prints `interrupted: 3/6 rows committed; rerun the same command to resume` and exits 128 + the
signal's number (130, 143), as shells report a process ended by a signal. Committed units stay;
the rerun resumes from them.

Ray's driver installs its own SIGTERM handler when it connects (`sys.exit`, whose shutdown of Ray's
core worker can abort with a native stack dump): `reinstall` puts this one back after `ray.init`.
"""

from __future__ import annotations

import signal
import threading


class Interrupted(BaseException):
    """The run was stopped by a signal (a BaseException, like KeyboardInterrupt: no handler of
    ordinary errors keeps it from ending the run)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


_installed = False


def _raise(signum, frame) -> None:
    raise Interrupted(signum)


def install() -> None:
    """Turn SIGTERM and SIGINT into Interrupted in this process (the CLI's entry point only)."""
    global _installed
    _installed = True
    reinstall()


def reinstall() -> None:
    """Put the handlers back (after ray.init replaced SIGTERM's); only where `install` ran."""
    if _installed and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _raise)


def signal_number(exc: BaseException) -> int:
    return exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
