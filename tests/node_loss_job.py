"""Runs one job on a three-node local Ray cluster and kills a worker node mid-job (tests/test_faults.py).

A separate process because ray.init is process-wide and the test session already holds a cluster.
usage: python tests/node_loss_job.py MODEL_CACHE WORKDIR
Writes WORKDIR/out (the job's output) and prints one line `RESULT {json}`: what was on the removed
node, when it went, and how the job ended. The test reads the output itself.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import psutil  # noqa: E402
import ray  # noqa: E402
from ray._private.state import actors  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from kandinsky_engine.jobs.run import run_job  # noqa: E402
from tests.conftest import make_config, write_manifest  # noqa: E402
from tests.faults import Background, decoder_busy, stage_actors, title  # noqa: E402

ROWS = 24
SLOW = dict(width=128, height=128, num_inference_steps=40)  # about a second of U-Net per block of 4
STAGES = ("PriorStage", "DecoderStage", "MovqStage")
WAIT_S = 300
STORE = 150 * 1024**2  # small object stores: three nodes share one small machine
# Notice a dead node in about 3 s instead of Ray's default ~30 s.
FAST_HEALTH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3, "health_check_timeout_ms": 1000}


def worker_processes(node) -> list[str]:
    """Titles of the Ray worker processes under a node's raylet: Ray names a busy worker after its task
    (e.g. `ray::MapWorker(MapBatches(DecoderStagePool)).submit`, `ray::Write`), an idle one `ray::IDLE`."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    return sorted(t for t in (title(p.pid) for p in raylet.children(recursive=True)) if t.startswith("ray::"))


def actors_now() -> list[dict]:
    return [{"stage": s, "actor": a["ActorID"], "pid": a["Pid"], "node": a["Address"]["NodeID"], "state": a["State"],
             "restarts": a["NumRestarts"]} for s in STAGES for a in stage_actors(s, ("ALIVE", "RESTARTING"))]


def start_cluster() -> tuple[Cluster, dict]:
    # The head has no CPUs, so every stage actor and task runs on one of the two workers and losing a
    # worker always takes work with it. The actors (3 x 0.2 CPU) pass check_resources (<= 4 - 1 CPUs)
    # and still fit the surviving worker's 2 CPUs.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": STORE, "include_dashboard": False, "_system_config": FAST_HEALTH})
    workers = {n.node_id: n for n in (cluster.add_node(num_cpus=2, object_store_memory=STORE) for _ in range(2))}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster, workers


def main(cluster: Cluster, workers: dict, cache: str, work: Path) -> dict:
    manifest = write_manifest(work / "manifest.parquet", [{"id": f"row-{i:03d}", "prompt": f"p {i}"} for i in range(ROWS)])
    config = make_config(cache, manifest, str(work / "out"), fuse_stages=False, input={"rows_per_block": 4}, defaults=SLOW)
    started = time.monotonic()
    job = Background(lambda: run_job(config, address=cluster.address))
    job.start()

    # Wait until the job has written something and the decoder is inside a call (its process is
    # titled after the task) on a worker: that worker goes, with the block in flight on it.
    deadline, victim, seen = started + WAIT_S, None, []
    while victim is None and job.is_alive() and time.monotonic() < deadline:
        shards_before = len(list((work / "out" / "data").rglob("*.parquet")))
        before = actors_now()
        decoder = next((a for a in before if a["stage"] == "DecoderStage" and a["state"] == "ALIVE"), None)
        processes = worker_processes(workers[decoder["node"]]) if decoder and decoder["node"] in workers else []
        state = (shards_before, decoder and decoder["node"][:8], [p for p in processes if "Decoder" in p])
        if not seen or seen[-1][1:] != list(state):  # transitions only: shown if no worker qualifies
            seen.append([round(time.monotonic() - started, 1), *state])
        if shards_before and any(decoder_busy(p) for p in processes):
            victim = decoder["node"]
        time.sleep(0.1)
    if victim is None:
        return {"error": f"no removable worker found (job alive: {job.is_alive()}, job error: {job.error!r})",
                "seen": seen}
    removed_at = time.monotonic() - started
    cluster.remove_node(workers[victim], allow_graceful=False)  # abrupt, like a lost machine
    running_after_removal = job.is_alive()
    job.join(WAIT_S)
    # The actors that were on the lost node, as Ray's actor table has them at the end (they are
    # DEAD once the job has finished, their last incarnation's node and restart count kept).
    lost = [a for a in before if a["node"] == victim]
    final = {a["actor"]: actors(actor_id=a["actor"]) for a in lost}
    return {
        "removed_node": victim,
        "seen": seen,
        "workers": sorted(workers),
        "on_removed_node": lost,
        "processes_on_removed_node": processes,
        "lost_actors_last_node": {k: v["Address"]["NodeID"] for k, v in final.items()},
        "lost_actors_restarts": {k: v["NumRestarts"] for k, v in final.items()},
        "actors_before": before,
        "removed_at_s": round(removed_at, 1),
        "shards_before_removal": shards_before,
        "running_after_removal": running_after_removal,
        "alive_nodes_after": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
        "finished": not job.is_alive(),
        "job_s": round(time.monotonic() - started, 1),
        "error": None if job.error is None else repr(job.error),
        "summary_rows": job.result and job.result["rows"],
    }


if __name__ == "__main__":
    cluster, workers = start_cluster()
    try:
        print("RESULT " + json.dumps(main(cluster, workers, sys.argv[1], Path(sys.argv[2]))), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()  # stops the raylets and GCS this script started
    os._exit(0)  # a job thread that hung must not keep the process alive
