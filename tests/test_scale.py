"""Scale: a manifest prefix that grows between runs, one run at a time per output (the lease), and
files that change or are still being written."""

from __future__ import annotations

from functools import partial

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobs.lease import Lease, LeaseHeld
from jobs.run import ManifestChanged, run_job
from jobs.verify import verify
from kandinsky_engine.storage import url_to_fs
from tests.conftest import make_config, put_manifest, write_manifest

# Jobs of many units: a pool per stage keeps both cores busy (fused stages are one actor here).
make_config = partial(make_config, fuse_stages=False)

pytestmark = pytest.mark.ray

UNIT = 4


def rows(name: str, n: int) -> list[dict]:
    return [{"id": f"{name}-{i}", "prompt": f"a kite over {name}, {i}"} for i in range(n)]


def test_growing_manifest_prefix_on_s3(ray_cluster, model_cache, s3):
    """2 files, then 3, then 5: each run computes only the new files' units, nothing committed is
    touched, and the output equals one run over the 5 files, byte for byte; a file rewritten under
    its name is refused, naming it."""
    fs, options = s3
    sizes = {"a": 6, "b": 3, "c": 5, "d": 4, "e": 7}

    def config(out: str):
        c = make_config(model_cache, "s3://kandinsky/grow/manifests/", out, input={"rows_per_block": UNIT})
        return c.model_copy(update={"storage_options": options})

    computed = []
    for batch in (("a", "b"), ("c",), ("d", "e")):
        for name in batch:
            put_manifest(fs, f"kandinsky/grow/manifests/{name}.parquet", rows(name, sizes[name]))
        before = {k: fs.info(k)["ETag"] for k in fs.find("kandinsky/grow/out/data")} if computed else {}
        summary = run_job(config("s3://kandinsky/grow/out"))
        computed.append(summary["rows_computed"])
        fs.invalidate_cache()
        after = {k: fs.info(k)["ETag"] for k in fs.find("kandinsky/grow/out/data")}
        assert {k: after[k] for k in before} == before  # committed shards untouched
        assert summary["complete"] and [f["file"] for f in summary["files"]] == sorted(f"{n}.parquet" for n in sizes
                                                                                       if n <= batch[-1])
    assert computed == [9, 5, 11]
    assert verify("s3://kandinsky/grow/out", config=config("s3://kandinsky/grow/out")).ok

    single = run_job(config("s3://kandinsky/grow/single"))
    assert single["rows"] == sum(sizes.values())
    grown = {s["file"]: s["sha256"] for s in run_job(config("s3://kandinsky/grow/out"))["shards"]}
    assert grown == {s["file"]: s["sha256"] for s in single["shards"]}  # byte for byte, shard by shard

    put_manifest(fs, "kandinsky/grow/manifests/c.parquet", rows("c", sizes["c"])[::-1])  # same ids, new order
    with pytest.raises(ManifestChanged, match=r"c\.parquet \(2 committed unit\(s\)\)"):
        run_job(config("s3://kandinsky/grow/out"))


def test_a_file_still_being_written_is_never_half_read(ray_cluster, model_cache, tmp_path):
    """The contract: writers put files in place whole (object stores do; on disk, write to a name the
    listing skips, `_name` or `.name`, then rename). A truncated `*.parquet` is refused, named."""
    folder = tmp_path / "manifests"
    write_manifest(folder / "a.parquet", rows("a", 4))
    write_manifest(folder / "_incoming.parquet", rows("b", 4))  # being written: skipped
    (folder / ".c.parquet.partial").write_bytes(b"PAR1 half")
    config = make_config(model_cache, str(folder), str(tmp_path / "out"), input={"rows_per_block": UNIT})
    summary = run_job(config)
    assert (summary["rows"], [f["file"] for f in summary["files"]]) == (4, ["a.parquet"])
    (folder / "d.parquet").write_bytes((folder / "a.parquet").read_bytes()[:60])  # a torn upload
    with pytest.raises(ValueError, match=r"d\.parquet: cannot read as Parquet"):
        run_job(config)


# --- one run at a time -----------------------------------------------------------------------

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

    def plant(host, pid, ttl):
        fs.pipe_file(f"{root}/_LEASE.json", json.dumps({"owner": "x", "host": host, "pid": pid,
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
    plant(__import__("socket").gethostname(), dead.pid, 600)  # this machine, its process gone: at once
    lease = Lease(fs, root, 30, root)
    lease.acquire()
    lease.release()
    plant(__import__("socket").gethostname(), os.getpid(), 600)  # this machine, alive: held
    with pytest.raises(LeaseHeld):
        Lease(fs, root, 30, root).acquire()


def test_a_second_run_exits_3_or_waits(ray_cluster, model_cache, tmp_path, capsys):
    from jobs.cli import main

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
from jobs.lease import Lease
from kandinsky_engine.storage import url_to_fs
root = sys.argv[1]
Lease(url_to_fs(root)[0], root, float(sys.argv[2]), root).acquire()
print("held", flush=True)
time.sleep(600)
"""


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
