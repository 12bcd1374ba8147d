"""One run at a time per output: a lease object at PATH/_LEASE.json.

A run takes the lease before it writes anything and renews it from a background thread every
third of its time to live (`output.lease_ttl_s`). A second run of the same output finds the lease
held and exits at once (exit code 3), or with --wait polls until it is free (--wait-timeout S: for
at most S seconds, then exit 3). A lease whose owner
stopped renewing (killed, or its machine lost) expires and is taken over by the next run, which
then resumes the output like any rerun; an owner that ran on the same machine and whose process is
gone is taken over at once (a driver killed and rerun in place).

Atomicity, by store:
- S3 (and stores that speak its API): conditional writes. Taking a free lease is a PutObject with
  `If-None-Match: *`; renewing or taking over an expired one is a PutObject with `If-Match` on the
  ETag that was read, so of two runs racing for it exactly one wins.
- Local disk: every change under a file lock (flock, in the temp folder): atomic among the runs
  of one machine, which is where a local output is written from.
- Other fsspec stores: read, compare, write. Best effort: two runs starting in the same instant
  can both proceed. Say so, and schedule such jobs with `concurrencyPolicy: Forbid`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone

from kandinsky_engine.storage import redact_url

LEASE = "_LEASE.json"
log = logging.getLogger("kandinsky_engine")


class LeaseHeld(RuntimeError):
    """Another run holds the output's lease (the CLI exits 3)."""


def _now() -> float:
    return time.time()


class Lease:
    def __init__(self, fs, root: str, ttl_s: float, name: str):
        self.fs, self.root, self.ttl_s, self.name = fs, root, ttl_s, name
        self.path = f"{root}/{LEASE}"
        self.owner = uuid.uuid4().hex
        self.started = _now()
        self.lost = False  # set when a renewal finds that another run took the lease
        self._stop = threading.Event()
        self._thread = None

    # -- the record ---------------------------------------------------------------------------

    def _record(self) -> bytes:
        now = _now()
        return json.dumps({
            "owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
            "started_at": _iso(self.started), "heartbeat_at": _iso(now), "expires_at": _iso(now + self.ttl_s),
            "expires_at_epoch": now + self.ttl_s,
        }, indent=2).encode()

    def _read(self) -> tuple[dict | None, str | None]:
        """(record, version) of the lease now there, (None, None) if there is none."""
        try:
            if _is_s3(self.fs):
                # The ETag before and after the read must agree, or the content may be another version's.
                while True:
                    self.fs.invalidate_cache(self.root)
                    before = self.fs.info(self.path)["ETag"]
                    payload = self.fs.cat_file(self.path)
                    self.fs.invalidate_cache(self.root)
                    if self.fs.info(self.path)["ETag"] == before:
                        return _parse(payload), before
            self.fs.invalidate_cache(self.root)
            payload = self.fs.cat_file(self.path)
            return _parse(payload), hashlib.sha256(payload).hexdigest()
        except FileNotFoundError:
            return None, None

    # -- taking, renewing, giving back --------------------------------------------------------

    def acquire(self, wait: bool | float = False, poll_s: float = 2.0) -> None:
        """Take the lease. `wait`: False, fail at once (LeaseHeld) while a live run holds it; True, wait
        for it as long as it takes; a number, wait at most that many seconds (a crashed run's lease
        expires within lease_ttl_s, so a bound above that covers a retry right after a crash)."""
        announced = False
        deadline = None if isinstance(wait, bool) else time.monotonic() + wait
        while True:
            if self._try_take():
                self._start_heartbeat()
                return
            record, _ = self._read()
            holder = _describe(record)
            if deadline is not None and time.monotonic() >= deadline:
                raise LeaseHeld(f"output {redact_url(self.name)} is being written by another run ({holder}); waited "
                                f"{wait:g} s for it (--wait-timeout)")
            if not wait:
                raise LeaseHeld(f"output {redact_url(self.name)} is being written by another run ({holder}); "
                                "wait for it to finish, pass --wait to start when it does, or use another "
                                "output.path")
            if not announced:
                log.info("output %s is being written by another run (%s); waiting for it", redact_url(self.name), holder)
                announced = True
            time.sleep(poll_s)

    def _try_take(self) -> bool:
        """Take the lease if it is free or expired; False if a live run holds it."""
        record, version = self._read()
        if record is not None and record.get("expires_at_epoch", 0) > _now() and not owner_died_here(record):
            return False
        if record is not None:
            log.warning("taking over the lease of output %s from a run that stopped renewing it (%s)",
                        redact_url(self.name), _describe(record))
        return self._write(expected=version if record is not None else None, create=record is None)

    def _write(self, expected: str | None, create: bool) -> bool:
        """Write our record if the lease is still as we read it (absent, or at version `expected`)."""
        payload = self._record()
        if _is_s3(self.fs):
            bucket, key = _split(self.fs, self.path)
            condition = {"IfNoneMatch": "*"} if create else {"IfMatch": expected}
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=payload, **condition)
            except Exception as exc:  # PreconditionFailed (412) or ConditionalRequestConflict (409): lost the race
                if _status(exc) in (409, 412):
                    return False
                raise
            return True
        if _is_local(self.fs):
            from filelock import FileLock

            # The lock file lives outside the output (flock only coordinates one machine anyway).
            lock = os.path.join(tempfile.gettempdir(), f"kandinsky-lease-{hashlib.sha256(self.path.encode()).hexdigest()[:16]}.lock")
            with FileLock(lock):
                current, version = self._read()
                if (current is None) != create or (not create and version != expected):
                    return False
                tmp = f"{self.path}.{self.owner}.tmp"
                with open(tmp, "wb") as f:
                    f.write(payload)
                os.replace(tmp, self.path)
            return True
        current, version = self._read()  # best effort: see the module docstring
        if (current is None) != create or (not create and version != expected):
            return False
        self.fs.pipe_file(self.path, payload)
        return True

    def renew(self) -> bool:
        """Extend the lease; False (and `lost`) if another run has taken it meanwhile."""
        record, version = self._read()
        if record is None or record.get("owner") != self.owner or not self._write(expected=version, create=False):
            self.lost = True
            log.error("output %s: this run lost its lease to another run; stop this run", redact_url(self.name))
            return False
        return True

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        record, _ = self._read()
        if record is not None and record.get("owner") == self.owner:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    if not self.renew():
                        return
                except Exception as exc:  # a storage hiccup: try again at the next beat
                    log.warning("output %s: could not renew the lease (%s)", redact_url(self.name), exc)

        self._thread = threading.Thread(target=beat, name="kandinsky-lease", daemon=True)
        self._thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def owner_died_here(record: dict) -> bool:
    """The lease's owner ran on this machine and its process is gone (a killed driver, resumed at
    once on the same machine): no need to wait for the lease to expire. A lease from another machine
    can only expire. A reused pid looks alive, which only means waiting for the expiry."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. another user's process: alive
        return False
    return False


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat()


def _parse(payload: bytes) -> dict:
    try:
        record = json.loads(payload)
        return record if isinstance(record, dict) else {}
    except ValueError:
        return {}  # torn or foreign: no expiry, so it counts as expired and is taken over


def _describe(record: dict | None) -> str:
    if not record:
        return "unknown owner"
    return (f"host {record.get('host')}, pid {record.get('pid')}, started {record.get('started_at')}, "
            f"lease until {record.get('expires_at')}")


def _is_s3(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool({"s3", "s3a"} & set(protocols))


def _is_local(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool({"file", "local"} & set(protocols))


def _split(fs, path: str) -> tuple[str, str]:
    bucket, _, key = fs._strip_protocol(path).partition("/")
    return bucket, key


def _status(exc: BaseException) -> int | None:
    for error in (exc, exc.__cause__, exc.__context__):
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None
