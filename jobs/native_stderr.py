"""Lines that Ray's C++ core worker writes straight to the driver's stderr (file descriptor 2), taken
off the console and into the job log.

Ray 2.60's core worker logs, once per process and at level E, that an actor "has constructor
arguments in the object store and max_restarts > 0" (ray-project/ray#53727). Every Ray Data actor
pool triggers it: Ray Data itself passes each pool actor its DataContext and its map function as
object references, and gives pool actors max_restarts=-1 so that a lost actor is restarted. Neither
is ours to change (restarts are how a killed U-Net actor is survived, tests/test_faults.py), and
the line is noise to an operator, so while a run writes its output, fd 2 is a pipe: a thread
forwards every line to the real stderr at once, except those matching `ROUTED`, which go to the
job log. Python's own stderr writes go through the same pipe unchanged.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading

ROUTED = re.compile(rb"core_worker\.cc:\d+: Actor .*has constructor arguments in the object store")


class NativeStderr:
    """While open, lines on fd 2 that match `ROUTED` go to `handler` (a logging handler: the job
    log's file) as records of the `ray.core_worker` logger, and everything else to stderr."""

    def __init__(self, handler: logging.Handler):
        self.handler = handler
        _flush()
        self.saved = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.thread = threading.Thread(target=self._pump, args=(read,), name="kandinsky-stderr", daemon=True)
        self.thread.start()

    def _pump(self, fd: int) -> None:
        pending = b""
        while chunk := os.read(fd, 65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._route(line + b"\n")
            # A log line arrives whole (one write, under PIPE_BUF); anything else that has no
            # newline yet (a prompt, a carriage-return bar) is passed on at once.
            if pending and not pending.startswith(b"["):
                self._write(pending)
                pending = b""
        if pending:
            self._route(pending)
        os.close(fd)

    def _route(self, line: bytes) -> None:
        if ROUTED.search(line):
            text = line.decode("utf-8", "replace").rstrip()
            self.handler.handle(logging.LogRecord("ray.core_worker", logging.ERROR, __file__, 0, "%s", (text,), None))
        else:
            self._write(line)

    def _write(self, data: bytes) -> None:
        try:
            os.write(self.saved, data)
        except OSError:  # a closed console: nothing more to show
            pass

    def close(self) -> None:
        """fd 2 back to the real stderr; the pipe drains (what was written so far is routed)."""
        _flush()
        os.dup2(self.saved, 2)  # fd 2 held the pipe's last write end: the reader sees its end
        self.thread.join(timeout=5)  # a child process that inherited fd 2 may hold the pipe open
        if not self.thread.is_alive():  # else the thread still forwards to it: leave it open
            os.close(self.saved)


def _flush() -> None:
    try:
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 (a closed or replaced stream: nothing buffered to lose)
        pass
