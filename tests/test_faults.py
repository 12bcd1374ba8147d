"""Fault tolerance on real Ray: a decoder actor killed three times mid-job, a worker node removed
mid-job. Either way every manifest row must be written exactly once. Both shard formats are under
chaos: the decoder-kill job writes WebDataset tar shards, the node-loss job Parquet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kandinsky_engine.jobs.run import run_job
from tests.conftest import make_config, write_manifest
from tests.faults import Background, decoder_busy, duplicated, ids_in, stage_actors, title

pytestmark = pytest.mark.ray

# Decoder work in 6 blocks of 4 rows, about a second each here (128x128, 40 U-Net steps): each kill
# lands inside a block, and the retried block keeps the restarted actor busy for the next kill.
ROWS = 24
SLOW = dict(width=128, height=128, num_inference_steps=40)
WAIT_S = 300  # a hang must fail the test, not the CI job
ROOT = Path(__file__).resolve().parents[1]


def manifest(tmp: Path, n: int = ROWS) -> tuple[str, list[str]]:
    ids = [f"row-{i:03d}" for i in range(n)]
    return write_manifest(tmp / "manifest.parquet", [{"id": i, "prompt": f"prompt {i}"} for i in ids]), ids


def busy_decoder(job: Background, killed: set[int]) -> dict:
    """Waits for a live decoder actor process, not killed yet, that is running a block (a restarted
    actor is at once given the blocks that were in flight on the killed one)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if not job.is_alive():
            pytest.fail(f"the job ended before the decoder could be killed three times (killed {len(killed)}); "
                        f"make the job longer. error: {job.error!r}")
        for actor in stage_actors("DecoderStage"):
            if actor["Pid"] and actor["Pid"] not in killed and decoder_busy(title(actor["Pid"])):
                return actor
        time.sleep(0.05)
    pytest.fail("no busy decoder actor appeared")


def test_decoder_actor_killed_three_times(ray_cluster, model_cache, tmp_path):
    """On `output.format: webdataset`: a retried block must not leave a second tar of its unit."""
    from kandinsky_engine.jobs.verify import verify

    path, ids = manifest(tmp_path)
    config = make_config(model_cache, path, str(tmp_path / "out"), fuse_stages=False, input={"rows_per_block": 4},
                         defaults=SLOW, output={"format": "webdataset"})
    started = time.monotonic()
    job = Background(lambda: run_job(config))
    job.start()
    kills = []
    for _ in range(3):
        actor = busy_decoder(job, {k["pid"] for k in kills})
        os.kill(actor["Pid"], signal.SIGKILL)
        kills.append({"actor": actor["ActorID"], "pid": actor["Pid"], "restarts": actor["NumRestarts"],
                      "at_s": round(time.monotonic() - started, 1)})
    job.join(WAIT_S)
    took = time.monotonic() - started
    print(f"\ndecoder kills: {kills}\njob took {took:.1f} s")

    assert not job.is_alive(), "job still running"
    assert job.error is None, job.error
    assert len({k["pid"] for k in kills}) == 3
    # Ray restarted the same actor each time (max_restarts=-1): one actor, three restarts.
    assert len({k["actor"] for k in kills}) == 1 and [k["restarts"] for k in kills] == [0, 1, 2]
    out = Path(config.output.path)
    written, failed = ids_in(f"{out}/data"), ids_in(f"{out}/errors")  # ids from the tars' json members
    assert duplicated(written) == {}
    assert sorted(written) == ids and failed == []
    assert job.result["rows"] == ROWS and job.result["failed_rows"] == 0
    # One tar per unit of 4 rows, nothing else in data/ (no Parquet, no leftover temporary file).
    shards = sorted(p.relative_to(out).as_posix() for p in (out / "data").rglob("*") if p.is_file())
    assert len(shards) == ROWS // 4 and all(s.endswith("-a1.tar") for s in shards), shards
    assert {s["file"] for s in job.result["shards"]} == set(shards)
    check = verify(str(out))  # sha256 of every shard against its record, each tar read whole
    assert check.ok, check.problems
    assert (check.rows, check.failed_rows) == (ROWS, 0)


def test_worker_node_removed_mid_job(model_cache, tmp_path):
    """tests/node_loss_job.py runs a job on a head (0 CPUs) + 2 workers (2 CPUs each) cluster and kills
    the worker whose decoder actor is mid-call once the first shard is written."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "node_loss_job.py"), model_cache, str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    took = time.monotonic() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1].removeprefix("RESULT "))
    print(f"\nnode loss: {json.dumps(result, indent=1)}\nsubprocess took {took:.1f} s")

    assert result.get("error") is None and result["finished"], result
    removed = result["removed_node"]
    # A worker really went while the job was running, with the decoder actor and its block on it.
    assert removed in result["workers"] and removed not in result["alive_nodes_after"]
    assert result["running_after_removal"] and result["shards_before_removal"] >= 1
    assert any(a["stage"] == "DecoderStage" for a in result["on_removed_node"])
    assert any(decoder_busy(p) for p in result["processes_on_removed_node"])
    # Ray restarted each lost actor on a surviving node.
    for actor in result["on_removed_node"]:
        assert result["lost_actors_restarts"][actor["actor"]] >= 1
        assert result["lost_actors_last_node"][actor["actor"]] != removed
    out = tmp_path / "out"
    written, failed = ids_in(f"{out}/data"), ids_in(f"{out}/errors")
    expected = [f"row-{i:03d}" for i in range(24)]  # node_loss_job.ROWS
    assert duplicated(written) == {}
    assert sorted(written) == expected and failed == []
    assert result["summary_rows"] == len(expected)
    assert result["shards_before_removal"] < len(list((out / "data").rglob("*.parquet")))
