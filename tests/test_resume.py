"""Exactly-once resume: the driver is stopped at a third of a job by SIGTERM (what KubeRay, CronJobs
and `docker stop` send) and at two thirds by Ctrl-C (SIGINT), and the same command is run again each
time. Each stop prints one line and exits 143 / 130 having given its lease back; the final output
must equal an uninterrupted run's: every image byte for byte, every column alike but `created_at`
(when each unit's images were made). (SIGKILL, a driver that cannot clean up: tests/test_operator.py.)"""

from __future__ import annotations

from functools import partial

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kandinsky_engine.jobs.run import run_job
from tests.conftest import FAST, make_config, write_manifest

# Jobs of many units: a pool per stage keeps both cores busy (fused stages are one actor here).
make_config = partial(make_config, fuse_stages=False)

pytestmark = pytest.mark.ray

ROWS, UNIT = 24, 4  # 6 units: stops at 2 and 4


def job_rows() -> list[dict]:
    sizes = [(64, 64), (128, 64), (64, 128)]
    return [{"id": f"r{i:03d}", "prompt": f"a painting of a lighthouse number {i}", "width": sizes[i % 3][0],
             "height": sizes[i % 3][1], "negative_prompt": "blurry" if i % 4 == 0 else None} for i in range(ROWS)]


def sections() -> dict:
    return dict(input={"rows_per_block": UNIT}, prior={"batch_size": 2}, decoder={"batch_size": 3},
                movq={"batch_size": 4}, defaults={**FAST, "num_inference_steps": 4})


def committed_units(out: Path) -> int:
    return len(list((out / "data").rglob("part-*-a1.parquet"))) if (out / "data").exists() else 0


def run_cli(config_file: Path, log: Path, kill_at_units: int | None, signum: int = signal.SIGKILL) -> dict:
    """Runs the CLI as its own process; sends the driver `signum` once `kill_at_units` units are committed."""
    out = Path(json.loads(config_file.read_text())["output"]["path"])
    # The drivers attach to the session's cluster (as under `ray job submit`): a stopped driver's actors
    # go with it, and no run pays for starting a cluster of its own.
    import ray

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with open(log, "ab") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "kandinsky_engine.jobs.cli", "run", str(config_file)], stdout=sink,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=Path(__file__).parents[1])
        at_kill = None
        while proc.poll() is None:
            if kill_at_units is not None and committed_units(out) >= kill_at_units:
                at_kill = committed_units(out)
                proc.send_signal(signum)  # the driver only
                proc.wait(timeout=120)
                break
            time.sleep(0.05)
        lingering = _reap(proc.pid)
    return {"returncode": proc.returncode, "units_at_kill": at_kill, "lingering_ray_processes": lingering}


def _reap(pgid: int) -> int:
    """Ray's local processes share the driver's fate; wait for them, kill any that linger."""
    for _ in range(200):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return 0
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)
    return 1


def test_driver_stopped_by_sigterm_and_ctrl_c_then_rerun(ray_cluster, model_cache, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", job_rows())
    reference = run_job(make_config(model_cache, manifest, str(tmp_path / "reference"), **sections()))
    assert reference["rows"] == ROWS

    out = tmp_path / "resumed"
    config = make_config(model_cache, manifest, str(out), **sections())
    config_file = tmp_path / "job.json"  # JSON is YAML: the CLI reads it as its config
    config_file.write_text(json.dumps({**config.model_dump(mode="json"), "storage_options": {}}))
    log = tmp_path / "runs.log"
    units = ROWS // UNIT
    history = []
    for share, signum in ((1 / 3, signal.SIGTERM), (2 / 3, signal.SIGINT)):
        before = len(log.read_text()) if log.exists() else 0
        result = run_cli(config_file, log, kill_at_units=round(units * share), signum=signum)
        text = log.read_text()[before:]
        assert result["returncode"] == 128 + signum, text[-3000:]
        assert re.search(rf"interrupted: \d+/{ROWS} rows committed; rerun the same command to resume", text), text[-3000:]
        assert "Traceback" not in text and "core_worker" not in text.split("interrupted:")[1]
        assert not (out / "_SUCCESS.json").exists() and not (out / "_LEASE.json").exists()  # given back
        history.append(result)
    final = run_cli(config_file, log, kill_at_units=None)
    assert final["returncode"] == 0, log.read_text()[-3000:]

    summary = json.loads((out / "_SUCCESS.json").read_text())
    data = pq.read_table(out / "data")
    ids = data.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == ROWS  # 0 lost, 0 duplicated
    assert summary["rows"] == ROWS and summary["failed_rows"] == 0
    # As the uninterrupted run: the same shards, every image byte for byte, every column but created_at.
    want = {r["id"]: r for r in pq.read_table(tmp_path / "reference" / "data").drop_columns(["created_at"]).to_pylist()}
    assert {r["id"]: r for r in data.drop_columns(["created_at"]).to_pylist()} == want
    index = [r for r in pq.read_table(out / "_index.parquet").to_pylist() if r["file"].startswith("data/")]
    assert sorted(s["file"] for s in index) == sorted(s["file"] for s in reference["shards"])
    # Each run skipped what the killed runs had committed and computed only the rest.
    skipped = [int(n) for n in re.findall(r"already committed: (\d+) rows", log.read_text())]
    assert len(skipped) == 3 and skipped[0] == 0 and skipped == sorted(skipped), skipped
    runs = summary["runs"]
    assert len(runs) == 1  # the killed runs never reported; the last run did
    assert runs[0]["rows_skipped"] + runs[0]["rows_computed"] == ROWS
    assert runs[0]["rows_skipped"] >= round(units * 2 / 3) * UNIT
    print(f"\nstops at units {[h['units_at_kill'] for h in history]} of {units}; rows committed at each start "
          f"{skipped}; final run skipped "
          f"{runs[0]['rows_skipped']} and computed {runs[0]['rows_computed']} rows; lingering Ray process groups "
          f"{sum(h['lingering_ray_processes'] for h in history)}")
