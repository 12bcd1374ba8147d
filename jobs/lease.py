"""One run at a time per output: a lease object at PATH/_LEASE.json.

A run takes the lease before it writes anything and renews it from a background thread every
third of its time to live (`output.lease_ttl_s`). A second run of the same output finds the lease
held and exits at once (exit code 3), or with --wait polls until it is free (--wait-timeout S: for
at most S seconds, then exit 3). A lease whose owner
stopped renewing (killed, or its machine lost) expires and is taken over by the next run, which
then resumes the output like any rerun. A run also checks, in the writer, that it still holds the
lease before it commits each unit (pipelines/sink.py), so a run that lost it stops committing at once.

When a lease has expired is judged on the store's clock where there is one: on S3 the age of the
lease object is the response's `Date` minus the object's `LastModified`, both the store's, so
neither the writer's nor the reader's clock matters. On local disk the file's mtime and this
machine's clock (the one machine that shares the file lock). Elsewhere the writer's `expires_at`.

A lease whose owner ran on this machine and whose process is gone is taken over at once (a driver
killed and rerun in place). "This machine" and "that process" are judged strictly: the same boot
(the kernel's boot id), the same PID namespace (containers, `unshare --pid` and Kubernetes pods
with host networking share a hostname but not their PIDs), and the process with that PID started
at the recorded time (a reused PID is another process). Anything else can only expire.

Atomicity, by store:
- S3 (and stores that speak its API): conditional requests. Taking a free lease is a PutObject with
  `If-None-Match: *`; renewing or taking over an expired one is a PutObject with `If-Match` on the
  ETag that was read; giving it back is a DeleteObject with `If-Match`, so a run never deletes a
  lease another run took meanwhile. Of two runs racing, exactly one wins.
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
from email.utils import parsedate_to_datetime

from kandinsky_engine.storage import is_local, read_if_match, redact_url
from kandinsky_engine.pipelines.metrics import lease_renewed
from kandinsky_engine.pipelines.output import LEASE, LeaseLost  # noqa: F401 (LeaseLost: raised by the writer, re-exported)

log = logging.getLogger("kandinsky_engine")


class LeaseHeld(RuntimeError):
    """Another run holds the output's lease (the CLI exits 3)."""


def _now() -> float:
    return time.time()


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (/proc/PID/stat field 22); None if
    there is no such process (or no /proc)."""
    stat = _read_text(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split()[19] if stat else None


def process_identity() -> dict:
    """What tells this process apart from every other, also across containers on one host."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_ns": pid_ns, "process_start": process_start(os.getpid())}


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
            "owner": self.owner, **process_identity(), "ttl_s": self.ttl_s,
            "started_at": _iso(self.started), "heartbeat_at": _iso(now), "expires_at": _iso(now + self.ttl_s),
            "expires_at_epoch": now + self.ttl_s,
        }, indent=2).encode()

    def _read(self) -> tuple[dict | None, str | None, float | None]:
        """(record, version, age in seconds on the store's clock or None) of the lease now there;
        (None, None, None) if there is none."""
        try:
            if _is_s3(self.fs):
                bucket, key = _split(self.fs, self.path)
                while True:
                    head = self.fs.call_s3("head_object", Bucket=bucket, Key=key)
                    try:  # the version that was described, or none: never another version's bytes
                        payload = read_if_match(self.fs, self.path, head["ETag"])
                    except Exception as exc:
                        if _status(exc) == 412:
                            continue
                        raise
                    date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
                    age = (parsedate_to_datetime(date) - head["LastModified"]).total_seconds() if date else None
                    return _parse(payload), head["ETag"], age
            self.fs.invalidate_cache(self.root)
            payload = self.fs.cat_file(self.path)
            age = _now() - os.stat(self.fs._strip_protocol(self.path)).st_mtime if is_local(self.fs) else None
            return _parse(payload), hashlib.sha256(payload).hexdigest(), age
        except FileNotFoundError:
            return None, None, None

    def _expired(self, record: dict, age: float | None) -> bool:
        """Whether the lease stopped being renewed: by its age on the store's clock against the
        writer's ttl where both are known, else by the writer's `expires_at_epoch`."""
        ttl = record.get("ttl_s")
        if age is not None and isinstance(ttl, (int, float)):
            return age > ttl
        return record.get("expires_at_epoch", 0) <= _now()

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
            record, _, _ = self._read()
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
        record, version, age = self._read()
        if record is not None and not self._expired(record, age) and not owner_died_here(record):
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
        if is_local(self.fs):
            with self._local_lock():
                current, version, _ = self._read()
                if (current is None) != create or (not create and version != expected):
                    return False
                tmp = f"{self.path}.{self.owner}.tmp"
                with open(tmp, "wb") as f:
                    f.write(payload)
                os.replace(tmp, self.path)
            return True
        current, version, _ = self._read()  # best effort: see the module docstring
        if (current is None) != create or (not create and version != expected):
            return False
        self.fs.pipe_file(self.path, payload)
        return True

    def _local_lock(self):
        from filelock import FileLock

        # The lock file lives outside the output (flock only coordinates one machine anyway).
        return FileLock(os.path.join(tempfile.gettempdir(),
                                     f"kandinsky-lease-{hashlib.sha256(self.path.encode()).hexdigest()[:16]}.lock"))

    def renew(self) -> bool:
        """Extend the lease; False (and `lost`) if another run has taken it meanwhile."""
        record, version, _ = self._read()
        if record is None or record.get("owner") != self.owner or not self._write(expected=version, create=False):
            self.lost = True
            log.error("output %s: this run lost its lease to another run; it stops committing", redact_url(self.name))
            return False
        lease_renewed(self.name)
        return True

    def release(self) -> None:
        """Give the lease back, only if it is still ours (a conditional delete on S3)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        record, version, _ = self._read()
        if record is None or record.get("owner") != self.owner:
            return
        try:
            if _is_s3(self.fs):
                bucket, key = _split(self.fs, self.path)
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
            elif is_local(self.fs):
                with self._local_lock():
                    current, _, _ = self._read()
                    if current is not None and current.get("owner") == self.owner:
                        os.remove(self.fs._strip_protocol(self.path))
            else:
                self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass
        except Exception as exc:
            if _status(exc) not in (409, 412):  # taken meanwhile: it is the new owner's now
                raise

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
    """The lease's owner ran in this machine's boot and PID namespace and its process is gone (or
    its PID now belongs to a process started at another time): no need to wait for the expiry.
    Anything that cannot be judged that strictly (another host, container or boot, or a record
    without these fields) can only expire."""
    here = process_identity()
    if not isinstance(record.get("pid"), int) or any(
            record.get(k) is None or record.get(k) != here[k] for k in ("host", "boot_id", "pid_ns")):
        return False
    started = process_start(record["pid"])
    return started is None or started != record.get("process_start")


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


def _split(fs, path: str) -> tuple[str, str]:
    bucket, _, key = fs._strip_protocol(path).partition("/")
    return bucket, key


def _status(exc: BaseException) -> int | None:
    for error in (exc, exc.__cause__, exc.__context__):
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None
