"""One run at a time per output: the lease (jobs/lease.py) on local disk and on the moto S3 server.

Which owner counts as gone (same boot, PID namespace and process start, or expired on the store's
clock), that a release never deletes a lease another run took, and that a run whose lease was
taken stops committing at once and exits 3."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kandinsky_engine.jobs.lease import Lease, LeaseHeld, owner_died_here, process_identity
from kandinsky_engine.jobs.run import run_job
from kandinsky_engine.jobs.verify import verify
from kandinsky_engine.storage import url_to_fs
from tests.conftest import make_config, write_manifest

UNIT = 4


def rows(name: str, n: int) -> list[dict]:
    return [{"id": f"{name}-{i}", "prompt": f"a kite over {name}, {i}"} for i in range(n)]


def lease_root(where: str, tmp_path, s3, name: str):
    """(filesystem, output root) for a lease test, on local disk or on the moto S3 server."""
    root = str(tmp_path / "out") if where == "local" else f"kandinsky/{name}/out"
    fs = s3[0] if where == "s3" else url_to_fs(root)[0]
    fs.makedirs(root, exist_ok=True)
    return fs, root


@pytest.mark.parametrize("where", ["local", "s3"])
def test_of_two_racing_runs_exactly_one_takes_the_lease(where, tmp_path, s3):
    fs, root = lease_root(where, tmp_path, s3, "lease-race")
    for _ in range(5):
        leases, won = [Lease(fs, root, 30, root) for _ in range(4)], []
        barrier = threading.Barrier(len(leases))

        def take(lease):
            barrier.wait()
            try:
                lease.acquire()
                won.append(lease)
            except LeaseHeld:
                pass

        threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1
        won[0].release()
        fs.invalidate_cache()
        assert not fs.exists(f"{root}/_LEASE.json")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_lease_from_another_machine_expires_one_from_a_dead_local_process_does_not_wait(where, tmp_path, s3):
    fs, root = lease_root(where, tmp_path, s3, "lease-expiry")

    def plant(host, pid, ttl, here=False):  # a record of this machine names its boot and PID namespace
        identity = process_identity() if here else {}
        fs.pipe_file(f"{root}/_LEASE.json", json.dumps({"owner": "x", **identity, "host": host, "pid": pid,
                                                         "expires_at_epoch": time.time() + ttl}).encode())
        fs.invalidate_cache()

    plant("another-machine", os.getpid(), 2)
    with pytest.raises(LeaseHeld, match="another-machine"):
        Lease(fs, root, 30, root).acquire()
    started = time.monotonic()
    lease = Lease(fs, root, 30, root)
    lease.acquire(wait=True, poll_s=0.2)  # taken over once expired, not before
    assert 1.5 < time.monotonic() - started < 10
    lease.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    plant(__import__("socket").gethostname(), dead.pid, 600, here=True)  # this machine, its process gone: at once
    lease = Lease(fs, root, 30, root)
    lease.acquire()
    lease.release()
    plant(__import__("socket").gethostname(), os.getpid(), 600, here=True)  # this machine, alive: held
    with pytest.raises(LeaseHeld):
        Lease(fs, root, 30, root).acquire()


@pytest.mark.ray
def test_a_second_run_exits_3_or_waits(ray_cluster, model_cache, tmp_path, capsys):
    from kandinsky_engine.jobs.cli import main

    manifest = write_manifest(tmp_path / "m" / "m.parquet", rows("a", 4))
    config = make_config(model_cache, manifest, str(tmp_path / "out"), input={"rows_per_block": UNIT})
    job = tmp_path / "job.json"
    job.write_text(json.dumps({**config.model_dump(mode="json"), "storage_options": {}}))
    holder = Lease(url_to_fs(str(tmp_path / "out"))[0], str(tmp_path / "out"), 30, "other run")
    (tmp_path / "out").mkdir()
    holder.acquire()
    assert main(["run", str(job)]) == 3
    assert "busy: output" in capsys.readouterr().err and not (tmp_path / "out" / "_RUN.json").exists()
    threading.Timer(3, holder.release).start()
    started = time.monotonic()
    assert main(["run", str(job), "--wait"]) == 0
    assert time.monotonic() - started >= 3 and verify(str(tmp_path / "out")).ok


HOLDER = """
import sys, time
from kandinsky_engine.jobs.lease import Lease
from kandinsky_engine.storage import url_to_fs
root = sys.argv[1]
Lease(url_to_fs(root)[0], root, float(sys.argv[2]), root).acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.ray
def test_a_killed_owner_is_taken_over(ray_cluster, model_cache, tmp_path):
    manifest = write_manifest(tmp_path / "m" / "m.parquet", rows("a", 4))
    out = tmp_path / "out"
    out.mkdir()
    config = make_config(model_cache, manifest, str(out), input={"rows_per_block": UNIT}, output={"lease_ttl_s": 3})
    owner = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), "3"], stdout=subprocess.PIPE,
                             cwd=Path(__file__).parents[1], env={**os.environ})
    assert owner.stdout.readline().strip() == b"held"
    with pytest.raises(LeaseHeld):
        run_job(config)  # alive and renewing
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    summary = run_job(config, wait=True)  # taken over once its last renewal is 3 s old
    assert summary["rows"] == 4 and verify(str(out)).ok and not (out / "_LEASE.json").exists()


# --- who counts as gone ------------------------------------------------------------------------

def test_a_live_owner_in_another_pid_namespace_is_not_taken_over(tmp_path):
    """Containers with host networking and `unshare --pid` share the hostname, not the PIDs: a PID
    that does not exist here says nothing about the owner's process."""
    fs, root = lease_root("local", tmp_path, None, "ns")
    other = {**process_identity(), "pid": 4_194_301, "pid_ns": "pid:[4026530000]", "owner": "x", "ttl_s": 600,
             "expires_at_epoch": time.time() + 600}
    assert not owner_died_here(other)
    fs.pipe_file(f"{root}/_LEASE.json", json.dumps(other).encode())
    with pytest.raises(LeaseHeld, match="pid 4194301"):
        Lease(fs, root, 30, root).acquire()
    reused = {**process_identity(), "process_start": "1"}  # this PID, but started at another time
    assert owner_died_here(reused) and not owner_died_here(process_identity())


HOLDER = """
import sys, time
from kandinsky_engine.jobs.lease import Lease
from kandinsky_engine.storage import url_to_fs
root = sys.argv[1]
Lease(url_to_fs(root)[0], root, float(sys.argv[2]), root).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_run_in_an_unshared_pid_namespace_keeps_its_lease(tmp_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--pid", "--fork", "true"]).returncode:
        pytest.skip("unshare --pid is not allowed here")
    out = tmp_path / "out"
    out.mkdir()
    owner = subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, "-c", HOLDER, str(out), "600"],
                             stdout=subprocess.PIPE, cwd=Path(__file__).parents[1])
    try:
        assert owner.stdout.readline().strip() == b"held"
        record = json.loads((out / "_LEASE.json").read_text())
        assert record["pid_ns"] != process_identity()["pid_ns"] and record["host"] == process_identity()["host"]
        with pytest.raises(LeaseHeld):
            Lease(url_to_fs(str(out))[0], str(out), 30, str(out)).acquire()
    finally:
        owner.kill()
        owner.wait()


def test_expiry_is_judged_on_the_store_clock(s3, monkeypatch):
    """A reader whose clock runs an hour fast does not take over a lease renewed a moment ago."""
    fs, root = lease_root("s3", None, s3, "lease-clock")
    holder = Lease(fs, root, 600, root)
    holder.acquire()
    monkeypatch.setattr("kandinsky_engine.jobs.lease._now", lambda: time.time() + 3600)
    with pytest.raises(LeaseHeld):
        Lease(fs, root, 600, root).acquire()
    monkeypatch.undo()
    holder.release()


def test_a_release_never_deletes_a_lease_another_run_took(s3):
    fs, root = lease_root("s3", None, s3, "lease-release")
    first = Lease(fs, root, 30, root)
    first.acquire()
    first._stop.set()  # its heartbeat stops: the lease expires for the next run
    stale = first._read()  # what `first` reads just before the other run takes over
    record = json.loads(fs.cat_file(f"{root}/_LEASE.json"))
    fs.pipe_file(f"{root}/_LEASE.json", json.dumps({**record, "ttl_s": -1, "expires_at_epoch": 0}).encode())
    second = Lease(fs, root, 30, root)
    second.acquire()
    first._read = lambda: stale
    first.release()  # a conditional delete on the version it read: refused
    fs.invalidate_cache()
    assert json.loads(fs.cat_file(f"{root}/_LEASE.json"))["owner"] == second.owner
    second.release()
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/_LEASE.json")


@pytest.mark.ray
def test_a_run_whose_lease_is_taken_stops_committing_and_exits_3(ray_cluster, model_cache, tmp_path, capsys):
    from kandinsky_engine.jobs.cli import main

    manifest = write_manifest(tmp_path / "m" / "m.parquet", rows("a", 12))
    out = tmp_path / "out"
    config = make_config(model_cache, manifest, str(out), input={"rows_per_block": 1})
    job = tmp_path / "job.json"
    job.write_text(json.dumps({**config.model_dump(mode="json"), "storage_options": {}}))
    taken = threading.Event()

    def take_over():  # another run takes the lease once this one has committed a unit
        while not list((out / "data").rglob("*.parquet")) if (out / "data").exists() else True:
            time.sleep(0.05)
        record = json.loads((out / "_LEASE.json").read_text())
        (out / "_LEASE.json").write_text(json.dumps({**record, "owner": "another run", "ttl_s": -1}))
        taken.set()

    threading.Thread(target=take_over, daemon=True).start()
    assert main(["run", str(job)]) == 3
    assert taken.is_set() and "took over this run's lease" in capsys.readouterr().err
    committed = len(list((out / "data").rglob("*.parquet")))
    assert committed < 12 and not (out / "_SUCCESS.json").exists()
    time.sleep(1)
    assert len(list((out / "data").rglob("*.parquet"))) == committed  # and none after it stopped
    assert json.loads((out / "_LEASE.json").read_text())["owner"] == "another run"  # not deleted by the loser
    summary = run_job(config)  # the planted owner has a negative ttl: expired, taken over, resumed
    assert summary["rows"] == 12 and summary["rows_skipped"] == committed and verify(str(out)).ok
