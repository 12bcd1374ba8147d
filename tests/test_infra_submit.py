"""The real submission path: a Ray head started with `ray start --head` (dashboard on), the demo job
submitted through Ray's job submission API by the same shell command KubeRay's submitter pod runs
(K8sJobMode: `ray job status` || `ray job submit --no-wait --submission-id ID -- <entrypoint>`,
then `ray job logs --follow`), with rayjob.yaml's own entrypoint; then the rerun a RayJob retry or
the next scheduled run makes, which must resume (0 rows computed)."""

from __future__ import annotations

import json
import re
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from tests.infra_rules import ROOT, load_docs

pytestmark = [pytest.mark.slow, pytest.mark.ray]
BIN = Path(sys.executable).parent
IN_POD_CONFIG = "/home/ray/kandinsky/job.yaml"  # where rayjob.yaml's head mounts the job config


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def stop(proc: subprocess.Popen, temp: Path) -> None:
    """Stop this test's Ray head and only it: the process group of `ray start --block`, then any
    process still naming this head's own temp dir (workers, the job's driver, which Ray starts in
    sessions of their own). Never `ray stop`, which would stop every Ray on the machine."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: start_new_session=True
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    mine = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(temp) in " ".join(p.info["cmdline"] or []):
                mine.append(p)
        except psutil.Error:
            continue
    for p in mine:
        p.kill()
    psutil.wait_procs(mine, timeout=10)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head with the dashboard (the job submission API) on loopback, on its own ports and
    temp dir; yields (dashboard address, environment, its metrics export port)."""
    from ray.job_submission import JobSubmissionClient

    temp = Path(tempfile.mkdtemp(prefix="rayi-", dir="/tmp"))  # short: Ray's socket paths are limited
    gcs, dashboard, agent, agent_grpc, runtime_env, metrics, node, objects, client = free_ports(9)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}  # the entrypoint runs kandinsky-batch from PATH
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path_factory.mktemp("ray-head") / "ray-start.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--temp-dir={temp}", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
         f"--node-manager-port={node}", f"--object-manager-port={objects}", f"--ray-client-server-port={client}",
         "--num-cpus=2", "--num-gpus=0", "--object-store-memory=200000000", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"ray start --head did not come up:\n{Path(log.name).read_text()[-3000:]}")
                time.sleep(1)
        yield address, env, metrics
    finally:
        stop(proc, temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def submitter_command(address: str, job_id: str, entrypoint: str) -> str:
    """What KubeRay's submitter runs in K8sJobMode (ray-operator/controllers/ray/common/job.go,
    BuildJobSubmitCommand, v1.7.0), less its wait for the dashboard, which the fixture did."""
    return (f"if ! ray job status --address {address} {job_id} >/dev/null 2>&1 ; then "
            f"ray job submit --address {address} --no-wait --submission-id {job_id} -- {entrypoint} ; fi ; "
            f"ray job logs --address {address} --follow {job_id}")


def run_submitter(address: str, env: dict, job_id: str, entrypoint: str) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    done = subprocess.run(["bash", "-c", submitter_command(address, job_id, entrypoint)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = JobSubmissionClient(address).get_job_status(job_id)
    assert status == JobStatus.SUCCEEDED, done.stdout[-3000:]
    return done.stdout


def test_rayjob_entrypoint_runs_and_resumes_through_ray_job_submit(ray_head, model_cache, tmp_path):
    from ray.job_submission import JobSubmissionClient

    from kandinsky_engine.jobs.cli import main

    address, env, port = ray_head
    # The demo job (configs/demo.yaml) on its first 4 rows (one unit), into a temp output.
    rows = pq.read_table(ROOT / "configs" / "demo_manifest.parquet").slice(0, 4)
    pq.write_table(rows, tmp_path / "manifest.parquet")
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    out = tmp_path / "out"
    config["input"]["manifest"] = str(tmp_path / "manifest.parquet")
    config["output"]["path"] = str(out)
    config["model"]["cache_dir"] = model_cache  # the tiny model, already built
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    entrypoint = load_docs(ROOT / "infra" / "k8s" / "rayjob.yaml")[0]["spec"]["entrypoint"]
    assert IN_POD_CONFIG in entrypoint
    entrypoint = entrypoint.replace(IN_POD_CONFIG, shlex.quote(str(tmp_path / "job.yaml")))

    logs = run_submitter(address, env, "kandinsky-first", entrypoint)
    assert "done: 4 rows" in logs  # the driver's output, through `ray job logs`
    # Its metrics, as Prometheus reads them from the node's metrics export port (what
    # infra/k8s/components/monitoring's PodMonitor scrapes): rows and units committed, stage batch times.
    committed = scrape(port, "ray_kandinsky_rows_committed_total")
    assert sum(v for k, v in committed.items() if str(out) in k) == 4, committed
    units = scrape(port, "ray_kandinsky_units_committed_total")
    assert sum(v for k, v in units.items() if str(out) in k) == 1, units
    batches = scrape(port, "ray_kandinsky_stage_batch_seconds_count")
    assert {"PriorStage", "DecoderStage", "MovqStage"} <= {re.search(r'stage="(\w+)"', k)[1] for k in batches}
    summary = json.loads((out / "_SUCCESS.json").read_text())
    assert (summary["rows"], summary["rows_computed"], summary["failed_rows"], summary["complete"]) == (4, 4, 0, True)
    assert main(["verify", str(out)]) == 0

    # A retried submitter pod (same submission id) follows the job: it does not submit it again.
    # (The head is the module's: the other tests' jobs may be listed too, in any test order.)
    submitted = sorted(j.submission_id for j in JobSubmissionClient(address).list_jobs())
    assert "kandinsky-first" in submitted
    run_submitter(address, env, "kandinsky-first", entrypoint)
    assert sorted(j.submission_id for j in JobSubmissionClient(address).list_jobs()) == submitted
    assert len(list((out / "_runs").glob("*.json"))) == 1  # one run's report (and its shard records beside it)

    # A RayJob retry or the next scheduled run: the same entrypoint, a new submission, resumes.
    logs = run_submitter(address, env, "kandinsky-second", entrypoint)
    summary = json.loads((out / "_SUCCESS.json").read_text())
    assert (summary["rows"], summary["rows_computed"], summary["rows_skipped"]) == (4, 0, 4)
    assert "0 rows computed, 4 already committed" in logs
    assert main(["verify", str(out)]) == 0


def scrape(port: int, name: str, timeout_s: float = 60) -> dict[str, float]:
    """{labels: value} of metric `name` on a node's metrics endpoint, once it shows up (Ray's
    processes report their metrics every few seconds)."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        found = {m[1]: float(m[2]) for m in re.finditer(rf"^{name}(\{{[^}}]*\}}) ([0-9.e+-]+)$", text, re.M)}
        if found or time.monotonic() > deadline:
            return found
        time.sleep(2)


def test_a_stopped_job_frees_the_output_for_its_retry(ray_head, model_cache, tmp_path):
    """`ray job stop` (what deleting a RayJob or `kubectl delete` leads to) sends the driver SIGTERM:
    it stops committing and gives the lease back, so the retry starts at once (no exit 3, no wait
    for the lease to expire) and resumes from the committed units."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from kandinsky_engine.jobs.cli import main

    address, env, _ = ray_head
    client = JobSubmissionClient(address)
    rows = pq.read_table(ROOT / "configs" / "demo_manifest.parquet")
    pq.write_table(rows, tmp_path / "manifest.parquet")
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    out = tmp_path / "out"
    config["input"]["manifest"] = str(tmp_path / "manifest.parquet")
    config["output"]["path"] = str(out)
    config["model"]["cache_dir"] = model_cache
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    entrypoint = load_docs(ROOT / "infra" / "k8s" / "rayjob.yaml")[0]["spec"]["entrypoint"]
    entrypoint = entrypoint.replace(IN_POD_CONFIG, shlex.quote(str(tmp_path / "job.yaml")))
    client.submit_job(entrypoint=entrypoint, submission_id="kandinsky-stopped")
    deadline = time.monotonic() + 240
    while not list((out / "data").rglob("*.parquet")) if (out / "data").exists() else True:
        assert time.monotonic() < deadline and client.get_job_status("kandinsky-stopped") in (
            JobStatus.PENDING, JobStatus.RUNNING), \
            client.get_job_logs("kandinsky-stopped")[-3000:]
        time.sleep(0.5)
    client.stop_job("kandinsky-stopped")
    while client.get_job_status("kandinsky-stopped") not in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
        time.sleep(0.5)
    assert client.get_job_status("kandinsky-stopped") == JobStatus.STOPPED
    assert not (out / "_SUCCESS.json").exists()
    started = time.monotonic()
    logs = run_submitter(address, env, "kandinsky-retry", entrypoint)
    assert "busy:" not in logs and time.monotonic() - started < config["output"].get("lease_ttl_s", 120)
    summary = json.loads((out / "_SUCCESS.json").read_text())
    assert summary["rows"] == rows.num_rows and summary["rows_skipped"] >= 4 and summary["complete"]
    assert main(["verify", str(out)]) == 0
