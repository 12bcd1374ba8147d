"""What a running job tells its operator: one progress line at a steady interval (a live bar on a
terminal), `_runs/{run}.progress` (JSON) for `status` from any machine, and a log file that takes
Ray's own chatter off the console.

Counts come from the sink's write tasks through a CommitCounter actor (pipelines/progress.py),
polled by a driver thread. The progress file is metadata beside the run's report: it is written
through `_tmp/` and a move like every other file (on S3: a PUT, a copy and a delete every
`interval_s`, about 26,000 requests a day at 10 s), no run reads it to decide anything, and the
resume logic skips it (jobs/run.py, `read_reports`), so it cannot change what a rerun does.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from kandinsky_engine.storage import is_object_store
from kandinsky_engine.pipelines.metrics import images_per_second
from kandinsky_engine.pipelines.output import LOGS, RUNS, put_json

from .native_stderr import NativeStderr

log = logging.getLogger("kandinsky_engine")
PROGRESS_SUFFIX = ".progress"  # _runs/{run}.progress, JSON; not *.json, which are the runs' reports
RATE_WINDOW_S = 60.0  # images/s "over the last minute"
MAX_SAMPLES = 240  # points of the throughput history kept in the progress file (the report's chart)
# tqdm prefixes a postfix with ", " itself: `[00:11, 5 committed, 1 failed, ...]`, as its own default format.
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


@dataclass
class Console:
    """How a run reports to its operator. The library default is silent (tests, notebooks);
    `kandinsky-batch run` echoes progress to stdout and writes the log file."""

    interval_s: float = 10.0  # between progress lines and progress-file writes
    echo: bool = False  # progress lines (or a bar on a terminal) on stdout
    log_file: bool = False  # the driver's log, Ray Data's included, in OUTPUT/_logs/{run}.log
    verbose: bool = False  # Ray's operator dumps and workers' output on the console too

    def say(self, text: str) -> None:
        """A line for the operator: on stdout when echoing, else in the engine's log."""
        if self.echo:
            print(text, flush=True)
        else:
            log.info("%s", text)


def progress_path(root: str, tag: str) -> str:
    return f"{root}/{RUNS}/{tag}{PROGRESS_SUFFIX}"


def rate(samples, now_t: float, now_done: int, window_s: float = RATE_WINDOW_S) -> float | None:
    """Rows per second over the last `window_s` seconds, from (t, rows) samples in time order;
    over the whole run while it is younger than that. None before the first commit."""
    then = None
    for t, done in samples:
        if t <= now_t - window_s or then is None:
            then = (t, done)
    if then is None or now_t <= then[0] or now_done == 0:
        return None
    return (now_done - then[1]) / (now_t - then[0])


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RunProgress:
    """The driver's side of progress: polls the counter, prints, writes the progress file.
    `total`: rows the run covers; `done`: of those, already committed when it started."""

    def __init__(self, fs, root: str, tag: str, total: int, done: int, console: Console, counter=None,
                 log_path: str | None = None, alive=lambda: True):
        self.fs, self.root, self.tag, self.console = fs, root, tag, console
        self.total, self.done, self.counter, self.log_path, self.alive = total, done, counter, log_path, alive
        self.started_at, self.t0 = time.time(), time.perf_counter()
        self.snapshot = {"units": 0, "rows": 0, "failed": 0, "failures": {}, "stages": 0, "stages_ready": 0}
        self.recent: collections.deque = collections.deque()  # (t, rows) for the rate window
        self.history: list[list[float]] = [[0.0, 0]]  # (t, rows) every `stride` polls, for the chart
        self.stride, self.polls = 1, 0
        self.bar = None
        self._stop = threading.Event()
        self._thread = None

    # -- figures ----------------------------------------------------------------------------

    @property
    def processed(self) -> int:  # rows of this run committed, to data/ or errors/
        return self.snapshot["rows"] + self.snapshot["failed"]

    def figures(self) -> dict:
        """`committed` (the progress file's, read by `status`): rows of the scope done, in data/ or
        errors/; `rows`: of those, in data/; `failed`: in errors/ (this run's)."""
        now = time.perf_counter() - self.t0
        speed = rate(self.recent, now, self.processed)
        left = self.total - self.done - self.processed
        return {"committed": self.done + self.processed, "rows": self.done + self.snapshot["rows"], "total": self.total,
                "failed": self.snapshot["failed"], "images_per_s": None if speed is None else round(speed, 4),
                "eta_s": None if not speed else round(max(left, 0) / speed, 1), "elapsed_s": round(now, 3)}

    def loading(self) -> str | None:
        """`loading models: k/n stages ready` until this run's first commit (actors load their models
        first, for up to minutes), or None."""
        snap = self.snapshot
        if snap["units"] or not snap.get("stages"):
            return None
        if snap["stages_ready"] < snap["stages"]:
            return f"loading models: {snap['stages_ready']}/{snap['stages']} stages ready"
        return f"models loaded ({snap['stages']}/{snap['stages']} stages), first unit on its way"

    def status(self) -> str:
        """What follows the count: the loading phase, or committed and failed rows, rate and ETA."""
        f = self.figures()
        phase = self.loading()
        if phase:
            return phase
        speed = "?" if f["images_per_s"] is None else f"{f['images_per_s']:.2f}"
        return f"{f['rows']} committed, {f['failed']} failed, {speed} images/s over the last minute, ETA {clock(f['eta_s'])}"

    def line(self) -> str:
        f = self.figures()
        share = f"{100 * f['committed'] / f['total']:.0f}%" if f["total"] else "-"
        return f"progress: {f['committed']}/{f['total']} rows processed ({share}): {self.status()}"

    # -- the loop ----------------------------------------------------------------------------

    def start(self) -> None:
        if self.console.echo and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.done, unit="img", file=sys.stdout, dynamic_ncols=True,
                            bar_format=BAR_FORMAT)
        self.write("running")
        self._thread = threading.Thread(target=self._loop, name="kandinsky-progress", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        poll_s = 1.0 if self.bar is not None else self.console.interval_s  # a bar refreshes every second
        last_report = time.perf_counter()
        while not self._stop.wait(poll_s):
            try:
                self.poll()
                if time.perf_counter() - last_report >= self.console.interval_s - 1e-3:
                    last_report = time.perf_counter()
                    if self.console.echo and self.bar is None:
                        print(self.line(), flush=True)
                    self.write("running")
            except Exception as exc:  # a storage hiccup or a lost counter: the job goes on
                log.warning("progress: %s: %s", type(exc).__name__, exc)

    def poll(self) -> None:
        import ray

        if self.counter is not None:
            self.snapshot = ray.get(self.counter.snapshot.remote(), timeout=30)
        now = time.perf_counter() - self.t0
        self.recent.append((now, self.processed))
        while len(self.recent) > 2 and self.recent[1][0] <= now - RATE_WINDOW_S:
            self.recent.popleft()
        self.polls += 1
        if self.polls % self.stride == 0:
            self.history.append([round(now, 2), self.processed])
            if len(self.history) > MAX_SAMPLES:  # halve the resolution: bounded for any run length
                self.history, self.stride = self.history[::2], self.stride * 2
        if self.bar is not None:
            self.bar.n = self.figures()["committed"]
            self.bar.set_postfix_str(self.status().replace(" images/s over the last minute", " img/s (1 min)"))

    def write(self, state: str) -> None:
        if not self.alive():  # another run took the lease: its output is not ours to touch
            return
        now = time.time()
        if (speed := self.figures()["images_per_s"]) is not None:
            images_per_second(self.root, speed)
        put_json(self.fs, self.root, f"{RUNS}/{self.tag}{PROGRESS_SUFFIX}", {
            "run": self.tag, "state": state, "host": socket.gethostname(), "pid": os.getpid(),
            "started_at": _iso(self.started_at), "updated_at": _iso(now), "updated_at_epoch": now,
            "interval_s": self.console.interval_s, "rows_total": self.total, "rows_committed_before": self.done,
            **self.figures(), "units_committed": self.snapshot["units"], "failures": self.snapshot["failures"],
            "samples": self.history, "log": self.log_path,
        }, self.tag)

    def stop(self, state: str) -> None:
        """Final poll and write (`state`: finished or failed); stops the thread and the counter."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        try:
            self.poll()
            self.history.append([round(time.perf_counter() - self.t0, 2), self.processed])
            self.write(state)
        except Exception as exc:
            log.warning("progress: final write failed: %s: %s", type(exc).__name__, exc)
        if self.bar is not None:
            self.bar.close()
        elif self.console.echo:
            print(self.line(), flush=True)
        if self.counter is not None:
            import ray

            ray.kill(self.counter)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat()


# -- where the logs go -------------------------------------------------------------------------

class _ConsoleFilter(logging.Filter):
    """Ray Data's console: warnings and errors only; its progress UI hints never (the bar is ours)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and not record.name.startswith("ray.data._internal.progress")


def quiet_ray(verbose: bool) -> None:
    """Ray Data's operator dumps and notices go to its log files only (the session's
    logs/ray-data/ray-data.log, and the job log), unless `verbose`. Call before the plan runs."""
    import ray.data  # noqa: F401 (configures Ray Data's logging)

    if verbose:
        return
    from ray.data import DataContext

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and type(handler).__name__ != "SessionFileHandler":
            handler.addFilter(_ConsoleFilter())
    # On a terminal Ray Data draws its own bars; elsewhere it logs its operator status every few
    # seconds (to the files above). Ours replace its bars.
    DataContext.get_current().enable_progress_bars = not sys.stdout.isatty()


class JobLog:
    """The driver's log of one run in OUTPUT/_logs/{run}.log: our records and Ray Data's (operator
    status, execution plan, stats), and the core worker's notice about actor arguments
    (jobs/native_stderr.py). An object store gets it uploaded when the run ends; meanwhile
    it is in Ray's session log folder. Workers' output (model loading, weight-loading bars) stays
    in Ray's session logs unless `--verbose` sends it to the console."""

    LOGGERS = ("kandinsky_engine", "ray.data")

    def __init__(self, fs, root: str, tag: str):
        self.fs, self.root, self.tag = fs, root, tag
        self.remote = is_object_store(fs)
        self.target = f"{root}/{LOGS}/{tag}.log"
        if self.remote:
            self.local = os.path.join(_session_logs() or tempfile.gettempdir(), f"kandinsky-{tag}.log")
        else:
            os.makedirs(f"{root}/{LOGS}", exist_ok=True)
            self.local = self.target
        self.handler = logging.FileHandler(self.local, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handler.setLevel(logging.INFO)  # Ray Data logs DEBUG to its own files; INFO has its operator status
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self.handler)
        self.worker_logs = _session_logs() or "Ray's session logs on the cluster's nodes"
        self.handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, "workers' output (model loading): %s",
                                           (self.worker_logs,), None))  # in the file only
        self.native = NativeStderr(self.handler)  # Ray's core worker notice about actor arguments: here only

    def close(self) -> None:
        self.native.close()
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self.handler)
        self.handler.close()
        if self.remote:
            try:
                with open(self.local, "rb") as f:
                    self.fs.pipe_file(self.target, f.read())  # one PUT; a log is not part of the commit protocol
            except Exception as exc:
                log.warning("could not upload the job log to %s: %s", self.target, exc)


def _session_logs() -> str | None:
    """Ray's log folder of this session on this machine (workers' stdout and stderr), if it has one."""
    import ray

    node = ray._private.worker._global_node  # no public accessor in Ray 2.60
    return os.path.join(node.get_session_dir_path(), "logs") if node is not None else None
